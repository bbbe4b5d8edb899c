"""The QDQ graph in the form onnxruntime turns into integer convolutions (``qtrain-export --format qdq``).

A runtime replaces DequantizeLinear -> Conv -> QuantizeLinear by one integer convolution (QLinearConv)
only when nothing stands between the Conv and the QuantizeLinear. In qtrain's networks a batch norm, the
staircase's half-step shift and its Clip stand there, so this module rewrites the exported network
(torch.fx) before it goes to ONNX:

- **batch norm into the convolution**: Q(w) = codes x s becomes codes x (s gamma / sigma), one scale per
  output channel (the codes' signs flipped where gamma < 0, so every scale is positive), and the bias
  beta - mu gamma / sigma; the codes are multiplied by m = 127 // max|codes| and the scales divided by it
  (the same weights), because the runtime rounds the bias to units of input scale x weight scale
  (``FoldedWeight.spread_codes``);
- **the half-step into the bias**: ceil(x / alpha) = round(x / alpha + 1/2) except at the ties, so the
  convolution's bias gets + alpha / 2 and the activation is QuantizeLinear(alpha, zero point 0), whose
  saturation at 0 is the lower end of the staircase;
- **the top of the staircase after it**: Min(codes, 2^b - 1) on the uint8 codes between the QuantizeLinear
  and the DequantizeLinear (for b < 8; an 8-bit staircase saturates by itself): an integer op, so the
  codes stay in the runtime's integer layout and the next convolution still starts from a DequantizeLinear;
- **a residual add before the staircase** (ResNet's conv-BN, + shortcut, staircase): the convolution's
  output is quantized first, with zero point 128 (signed), so that the add becomes an integer add
  (QLinearAdd) of it and the shortcut. Where the shortcut lies on the same grid (its alpha is the
  staircase's) that is exact except at the ties; otherwise the convolution's output is quantized at
  alpha / 8 and the sum rounded once more, which moves an activation by one step when the sum lies within
  alpha / 16 of a step (docs/EXPORT.md measures how many predictions that changes). Where int8 codes on
  alpha / 8 would saturate where it matters, ``residual_step`` takes the coarser grid that does not, up to
  alpha / 4; beyond that (8-bit activations, a shortcut whose levels reach more than about twice as high as
  the staircase's), or where the shortcut is not a staircase's levels, the add keeps the shifted form. With
  ``residual="float"`` the add stays in float instead (exact up to the ties, but that convolution is then
  a float one);
- **a level-preserving op between a staircase and a convolution** (max pooling, the option-A shortcut's
  subsampling and zero padding, flatten) gets a QuantizeLinear/DequantizeLinear at the staircase's alpha
  after it: exact, and the convolution again starts from a DequantizeLinear.

Every other pattern keeps the unfused, shifted form (``export.QDQStaircase``): correct, just not integer.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn


class _DequantizePerChannel(torch.autograd.Function):
    """int8 codes -> float weight, one scale per output channel; ONNX DequantizeLinear(axis=0)."""

    @staticmethod
    def forward(ctx, codes, scale, zero_point):
        return codes.to(scale.dtype) * scale.view(-1, *([1] * (codes.dim() - 1)))

    @staticmethod
    def symbolic(g, codes, scale, zero_point):
        return g.op("DequantizeLinear", codes, scale, zero_point, axis_i=0)


class FoldedWeight(nn.Module):
    """A quantized conv or linear layer with its batch norm (if any) folded in: int8 codes, a scale per output
    channel, a float bias."""

    def __init__(self, quantized: nn.Module, bn: nn.Module | None = None):
        super().__init__()
        layer = quantized.layer
        self.kind, self.options = type(layer), {}
        if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
            self.options = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
                                groups=layer.groups)
        codes = quantized.codes.to(torch.float64)
        out = codes.shape[0]
        scale = quantized.scale.to(torch.float64).expand(out).clone()
        bias = (layer.bias.detach().to(torch.float64) if layer.bias is not None
                else torch.zeros(out, dtype=torch.float64))
        if bn is not None:
            inv = 1 / torch.sqrt(bn.running_var.to(torch.float64) + bn.eps)
            gamma = bn.weight.detach().to(torch.float64) if bn.affine else torch.ones(out, dtype=torch.float64)
            beta = bn.bias.detach().to(torch.float64) if bn.affine else torch.zeros(out, dtype=torch.float64)
            scale = scale * gamma * inv
            bias = (bias - bn.running_mean.to(torch.float64)) * gamma * inv + beta
        sign = torch.where(scale < 0, -1.0, 1.0).to(torch.float64)
        codes = codes * sign.view(-1, *([1] * (codes.dim() - 1)))
        dead = scale == 0  # a channel batch norm zeroes (gamma = 0): codes 0, any positive scale
        codes[dead] = 0
        scale = torch.where(dead, torch.ones_like(scale), scale.abs())
        self.register_buffer("codes", codes.to(torch.int8))
        self.register_buffer("scale", scale.float())
        self.register_buffer("zero_point", torch.zeros(out, dtype=torch.int8))
        self.register_buffer("bias", bias.float())

    def spread_codes(self, input_top: int | None) -> None:
        """m x codes with scale / m: the same weights, with an m times finer grid for the bias.

        The integer convolution adds the bias in units of (input scale x weight scale), so the runtime rounds
        the bias to that grid, and where the sum of integer products sits next to a step an activation moves
        (with m = 1 the LeNet-5 of tests/test_export.py agrees with qtrain on fewer than 99 % of its
        predictions). m = 127 // max|codes| while the input codes stay below 128; with 8-bit inputs
        63 // max|codes|, so that a pair of products stays inside int16 (the u8 x s8 kernels of CPUs without
        VNNI saturate there: onnxruntime's reduce_range)."""
        limit = 127 if input_top is not None and input_top < 128 else 63
        m = max(1, limit // max(1, int(self.codes.abs().max())))
        self.codes = (self.codes.to(torch.int32) * m).to(torch.int8)
        self.scale = self.scale / m

    def forward(self, x):
        w = _DequantizePerChannel.apply(self.codes, self.scale, self.zero_point)
        if self.kind is nn.Conv2d:
            return F.conv2d(x, w, self.bias, **self.options)
        if self.kind is nn.Conv1d:
            return F.conv1d(x, w, self.bias, **self.options)
        return F.linear(x, w, self.bias)


def _quantize(x, alpha: float, zero_point: int = 0):
    """QuantizeLinear -> DequantizeLinear, uint8, scale alpha (exported as that pair)."""
    return torch.fake_quantize_per_tensor_affine(x, alpha, zero_point, 0, 255)


class _LevelsOp(torch.autograd.Function):
    """QuantizeLinear(alpha, 0) -> Min(top) on the uint8 codes -> DequantizeLinear: the staircase on integers.
    The forward computes the same: round half to even of x / alpha, clamped to [0, top], times alpha."""

    @staticmethod
    def forward(ctx, x, alpha, zero_point, top: int):
        return torch.clamp(torch.round(x / alpha), 0, top) * alpha

    @staticmethod
    def symbolic(g, x, alpha, zero_point, top: int):
        codes = g.op("QuantizeLinear", x, alpha, zero_point)
        if top < 255:  # (8 bits: the uint8 saturation is the top)
            codes = g.op("Min", codes, g.op("Constant", value_t=torch.tensor(top, dtype=torch.uint8)))
        return g.op("DequantizeLinear", codes, alpha, zero_point)


class Levels(nn.Module):
    """The staircase after a layer whose bias holds the half-step: QuantizeLinear(alpha) (its saturation at 0
    is the lower end), Min with 2^b - 1 on the uint8 codes (the upper end), DequantizeLinear. The Min is an
    integer op between the Q and the DQ, so the runtime keeps the codes in its integer layout."""

    def __init__(self, bits: int, alpha: float):
        super().__init__()
        self.top, self.alpha = 2**bits - 1, float(alpha)
        self.register_buffer("alpha_t", torch.tensor(self.alpha))
        self.register_buffer("zero_point", torch.tensor(0, dtype=torch.uint8))

    def forward(self, x):
        return _LevelsOp.apply(x, self.alpha_t, self.zero_point, self.top)


class Grid(nn.Module):
    """Q -> DQ at ``scale`` with ``zero_point``: exact on values already on that grid (a staircase's levels
    after max pooling or the option-A shortcut), a rounding of a convolution's output before a residual add."""

    def __init__(self, scale: float, zero_point: int = 0):
        super().__init__()
        self.scale, self.zero_point = float(scale), zero_point

    def forward(self, x):
        return _quantize(x, self.scale, self.zero_point)


#: ops that keep a staircase's levels on its grid (zero padding included)
_LEVEL_PRESERVING_FUNCTIONS = {operator.getitem, F.pad, torch.flatten, F.max_pool2d, F.max_pool1d}
_LEVEL_PRESERVING_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.Flatten, nn.Identity, nn.Dropout)


def residual_step(alpha: float, top: int, shortcut: nn.Module | None) -> float | None:
    """The grid of the convolution's output before an integer residual add (int8 codes, zero point 128).

    127 steps must reach the staircase's top, and -128 steps plus the largest shortcut must stay at its
    bottom, or the codes saturate where it matters. The staircase's own alpha where the shortcut carries
    levels of it (then the add is exact but for the ties) and it is coarse enough; else alpha / 8, or the
    finer grid that does not saturate up to alpha / 4 (each rounding moves a level by one step where the sum
    lies within half a grid step of a step). None, and a float add, beyond that (a shortcut whose levels reach
    more than about twice as high as this staircase's) or where the shortcut is not a staircase's levels."""
    if shortcut is None:
        return None
    needed = max(top * alpha / 127, shortcut.top * float(shortcut.alpha) / 128)
    if float(shortcut.alpha) == alpha and alpha >= needed:
        return alpha
    step = max(alpha / 8, needed)
    return step if step <= alpha / 4 else None


class _Tracer(fx.Tracer):
    def __init__(self, leaves: tuple):
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m, name):
        return isinstance(m, self.leaves) or super().is_leaf_module(m, name)


RESIDUAL = ("integer", "float")


def fold_for_integer_kernels(model: nn.Module, quantized_type: type, staircase_type: type,
                             residual: str = "integer") -> fx.GraphModule:
    """``model`` (from ``export.export_model(fmt="qdq")``: ``quantized_type`` layers, ``staircase_type``
    activations) rewritten as the module docstring says; the forward is the same up to the ties, float
    rounding, and (``residual="integer"``) the residual adds' rounding."""
    assert residual in RESIDUAL, residual
    # leaves: what the rewrite looks at (qtrain's batch norms are subclasses, which fx would trace into)
    leaves = (quantized_type, staircase_type, FoldedWeight, nn.modules.batchnorm._BatchNorm)
    gm = fx.GraphModule(model, _Tracer(leaves).trace(model))
    rewrite = _Rewrite(gm, quantized_type, staircase_type, residual)
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.modules.batchnorm._BatchNorm):
            rewrite.fold_batch_norm(node)
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), staircase_type):
            rewrite.staircase(node)
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), (quantized_type, FoldedWeight)):
            rewrite.input_on_grid(node)
    gm.graph.lint()
    gm.recompile()
    return gm.eval()


class _Rewrite:
    def __init__(self, gm: fx.GraphModule, quantized_type: type, staircase_type: type, residual: str):
        self.gm, self.quantized, self.staircase_type, self.count = gm, quantized_type, staircase_type, 0
        self.residual = residual

    def module(self, node):
        return self.gm.get_submodule(node.target) if node.op == "call_module" else None

    def layer(self, node):
        """``node`` as a FoldedWeight when it is a quantized layer used only once (so its bias is its own)."""
        m = self.module(node)
        if len(node.users) != 1 or not isinstance(m, (self.quantized, FoldedWeight)):
            return None
        if isinstance(m, self.quantized):
            m = FoldedWeight(m)
            self.gm.add_submodule(node.target, m)
        return m

    def fold_batch_norm(self, bn_node):
        src = bn_node.args[0]
        if not isinstance(self.module(src), self.quantized) or len(src.users) != 1:
            return  # (a float layer's batch norm: the runtime folds that one itself)
        self.gm.add_submodule(src.target, FoldedWeight(self.module(src), self.module(bn_node)))
        bn_node.replace_all_uses_with(src)
        self.gm.graph.erase_node(bn_node)

    def insert_after(self, node, module: nn.Module):
        self.count += 1
        name = f"qdq_{self.count}"
        self.gm.add_submodule(name, module)
        with self.gm.graph.inserting_after(node):
            new = self.gm.graph.call_module(name, (node,))
        node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
        return new

    def grid_of(self, node) -> float | None:
        """The alpha of the staircase whose levels ``node`` carries unchanged, if any."""
        source = self.staircase_of(node)
        return None if source is None else float(source.alpha)

    def staircase_of(self, node) -> nn.Module | None:
        """The staircase whose levels ``node`` carries unchanged, if any."""
        while True:
            m = self.module(node)
            if isinstance(m, (self.staircase_type, Levels)):
                return m
            level_preserving = (isinstance(m, _LEVEL_PRESERVING_MODULES) if m is not None else
                                node.op == "call_function" and node.target in _LEVEL_PRESERVING_FUNCTIONS)
            if not level_preserving or not node.args or not isinstance(node.args[0], fx.Node):
                return None
            node = node.args[0]

    def staircase(self, node):
        st, src = self.module(node), node.args[0]
        bits, alpha = st.top.bit_length(), float(st.alpha)
        layer = self.layer(src)
        if layer is not None:  # conv (+ BN) -> staircase
            layer.bias += alpha / 2
        elif (src.op == "call_function" and src.target in (operator.add, torch.add) and len(src.users) == 1
              and self.residual == "integer"):
            a, b = src.args[:2]
            if not isinstance(a, fx.Node) or not isinstance(b, fx.Node):
                return  # (x + a constant: keep the shifted form)
            layer = self.layer(a)
            if layer is None:  # (the convolution may be either operand)
                a, b = b, a
                layer = self.layer(a)
            if layer is None:
                return  # keep the shifted form
            shortcut = self.staircase_of(b)
            step = residual_step(alpha, st.top, shortcut)
            if step is None:
                return  # keep the shifted form: the int8 codes could not hold the convolution's output
            layer.bias += alpha / 2
            self.insert_after(a, Grid(step, zero_point=128))
            if not self.quantized_output(b):
                self.insert_after(b, Grid(float(shortcut.alpha)))  # (QLinearAdd takes it from a DequantizeLinear)
        else:
            return
        self.gm.add_submodule(node.target, Levels(bits, alpha))

    def quantized_output(self, node) -> bool:
        """Whether ``node``'s value comes out of a DequantizeLinear already."""
        return isinstance(self.module(node), (Levels, Grid, self.staircase_type))

    def input_on_grid(self, node):
        x = node.args[0]
        if isinstance(self.module(node), FoldedWeight):
            source = self.staircase_of(x)
            self.module(node).spread_codes(None if source is None else source.top)
        if self.quantized_output(x):
            return
        alpha = self.grid_of(x)
        if alpha is not None:
            self.insert_after(x, Grid(alpha))
