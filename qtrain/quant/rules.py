"""Which weights a method quantizes (``quant_layers``): the layer rules of the papers' code."""

from __future__ import annotations

from torch import nn

from qtrain.errors import ConfigError

QUANT_LAYER_RULES = ("all", "all_but_last", "all_but_first_last")


def quantized_weight_names(model: nn.Module, rule: str) -> list[str]:
    """Names of the conv/linear weights that the rule quantizes, in model order.

    all                 every conv and linear weight
    all_but_last        all but the last linear layer (default; both official codes)
    all_but_first_last  also keeps the first layer float ([BCGD]'s 65.46 % variant)
    Biases and normalisation parameters always stay float.
    """
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))]
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if rule == "all":
        keep = layers
    elif rule == "all_but_last":
        keep = [n for n in layers if not linears or n != linears[-1]]
    elif rule == "all_but_first_last":
        keep = [n for n in layers[1:] if not linears or n != linears[-1]]
    else:
        raise ConfigError(f"quant_layers must be all | all_but_last | all_but_first_last, got {rule!r}.")
    return [f"{n}.weight" if n else "weight" for n in keep]
