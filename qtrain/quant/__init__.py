"""What values are allowed, mirroring configs/ste/ and the top-level abits/wbits/act/quant_layers keys:
:mod:`.ste` (one autograd.Function per straight-through estimator), :mod:`.act` (the quantized
activation and its alpha), :mod:`.weight` (the weight quantizers Q(w)), :mod:`.rules` (which layers)."""
