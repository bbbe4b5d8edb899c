"""The quantized activation: the staircase sigma_alpha of SPEC §1 as an ``nn.Module`` models receive
through ``act_layer``, its resolution alpha (the authors' table, the optimal one, a number, or a
learned parameter) and the learned alphas' gradient scaling and clamping.

The estimators (one autograd.Function per STE) are in :mod:`qtrain.quant.ste`; the weight
quantizers Q(w) in :mod:`qtrain.quant.weight`; how weights *move* towards Q(w) in qtrain/methods.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from qtrain.errors import ConfigError
from qtrain.quant.compact import CompactSTE
from qtrain.quant.fused import fused_staircase
from qtrain.quant.ste import ALPHA_GRADS, ROUNDINGS, STES, ProxySTE

#: act.impl, how the estimators are computed (never what: the same results): ste.py's (the ground truth);
#: compact.py's (one byte per element kept for the backward instead of the float input); fused.py's (one
#: kernel pass each way, 2 bits per element kept; compact.py's where it has no kernel)
IMPLS = ("reference", "compact", "fused")


def check_impl(impl) -> None:
    if impl not in IMPLS:
        raise ConfigError(f"act.impl must be one of {', '.join(IMPLS)}, got {impl!r}.")

# ---------------------------------------------------------------------------------------------
# Activation resolution alpha
# ---------------------------------------------------------------------------------------------

#: alpha used by the [STE] authors' code (Lloyd-type fit on half-Gaussian samples), by bits.
AUTHORS_ALPHA = {1: 1.2221, 2: 0.6511, 4: 0.1946}


def optimal_alpha(bits: int, rounding: str = "nearest") -> float:
    """The alpha minimising E[(sigma_alpha(X) - relu(X))^2] for X ~ N(0, 1).

    Numerical integration on a fine grid plus golden-section search: deterministic, no sampling.
    With ``rounding="nearest"`` this reproduces the authors' table (a test checks it); for the
    ceil staircase the optimum is different, which is why the rounding rule is a config option.
    """
    x = torch.linspace(0, 8, 400_001, dtype=torch.float64)[1:]
    pdf = torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    dx = float(x[1] - x[0])
    top = 2**bits - 1

    def mse(a: float) -> float:
        s = x / a
        k = torch.ceil(s) if rounding == "ceil" else torch.floor(s + 0.5)
        q = k.clamp(0, top) * a
        return float(((q - x) ** 2 * pdf).sum() * dx)

    lo, hi = 1e-3, 4.0
    g = (math.sqrt(5) - 1) / 2
    for _ in range(80):
        a, b = hi - g * (hi - lo), lo + g * (hi - lo)
        if mse(a) < mse(b):
            hi = b
        else:
            lo = a
    return (lo + hi) / 2


def resolve_alpha(bits: int, source, rounding: str) -> float:
    """alpha from the config: "authors" (table, else the optimum), "optimal", or a number."""
    if isinstance(source, (int, float)) and not isinstance(source, bool):
        if source <= 0:
            raise ConfigError(f"act.alpha must be positive, got {source}.")
        return float(source)
    if source == "authors" and bits in AUTHORS_ALPHA:
        return AUTHORS_ALPHA[bits]
    if source in ("authors", "optimal"):
        return optimal_alpha(bits, rounding)
    raise ConfigError(f"act.alpha must be 'authors', 'optimal' or a positive number, got {source!r}.")


# ---------------------------------------------------------------------------------------------
# The quantized activation
# ---------------------------------------------------------------------------------------------


class QuantReLU(nn.Module):
    """b-bit quantized ReLU, sigma_alpha(x) = alpha * clamp(ceil(x / alpha), 0, 2^b - 1).

    The backward pass uses the chosen straight-through estimator (see ste.py). ``alpha`` is a
    buffer when fixed ([STE]) and a Parameter when learned ([BCGD]); a learned alpha's gradient is
    scaled and clipped just before each optimizer step (:func:`scale_alpha_gradients`) and the alpha
    is clamped after it (:func:`clamp_learned_alphas`). ``enabled=False`` turns the module into a plain ReLU.
    """

    def __init__(self, bits: int, alpha: float, ste: str = "clipped_relu", rounding: str = "ceil",
                 learn_alpha: bool = False, alpha_grad: str = "mean", alpha_grad_scale: float = 0.01,
                 alpha_grad_clip: float = 1.0, alpha_clamp=(1e-3, 5.0), proxy=None):
        super().__init__()
        if ste not in STES and ste != "proxy":
            raise ConfigError(f"unknown ste {ste!r}; choose one of {sorted(STES) + ['proxy']}.")
        if rounding not in ROUNDINGS:
            raise ConfigError(f"act.rounding must be one of {ROUNDINGS}, got {rounding!r}.")
        if learn_alpha and alpha_grad not in ALPHA_GRADS:
            raise ConfigError(f"act.alpha_grad must be one of {ALPHA_GRADS}, got {alpha_grad!r}.")
        self.impl, self.inplace = "reference", False
        self.bits, self.ste, self.rounding = int(bits), ste, rounding
        self.proxy = proxy
        self.enabled = True
        self.alpha_grad = alpha_grad if learn_alpha else None
        self.alpha_clamp = tuple(alpha_clamp)
        value = torch.tensor(float(alpha))
        if learn_alpha:
            self.alpha = nn.Parameter(value)
            self.alpha_grad_scale, self.alpha_grad_clip = alpha_grad_scale, alpha_grad_clip
        else:
            self.register_buffer("alpha", value)

    def implemented_by(self, impl: str, inplace: bool = False) -> "QuantReLU":
        """How the activation is computed (``act.impl``), never what: every choice gives the same results.
        ``inplace``: the fused kernel may write the levels over its input, as nn.ReLU(inplace=True)."""
        check_impl(impl)
        self.impl, self.inplace = impl, inplace
        return self

    def share_alpha_with(self, other: "QuantReLU") -> None:
        """Use ``other``'s learned alpha (one alpha per ResNet block, as the [BCGD] code)."""
        if isinstance(self.alpha, nn.Parameter) and isinstance(other.alpha, nn.Parameter):
            del self.alpha
            self.alpha = other.alpha

    def forward(self, x):
        if not self.enabled:
            return torch.relu(x)
        if self.ste == "proxy":
            return ProxySTE.apply(x, self.alpha, self.bits, self.rounding, self.proxy)
        if self.impl == "fused":  # the same levels, masks and alpha gradient, one pass each way
            return fused_staircase(x, self.alpha, self.bits, self.rounding, self.alpha_grad, self.ste, self.inplace)
        if self.impl == "compact":  # the same levels, masks and alpha gradient, one byte kept per element
            return CompactSTE.apply(x, self.alpha, self.bits, self.rounding, self.alpha_grad, self.ste)
        return STES[self.ste].apply(x, self.alpha, self.bits, self.rounding, self.alpha_grad)

    def extra_repr(self):
        kind = "learned" if isinstance(self.alpha, nn.Parameter) else "fixed"
        return f"bits={self.bits}, alpha={float(self.alpha):.4g} ({kind}), ste={self.ste}, rounding={self.rounding}"


@torch.no_grad()
def scale_alpha_gradients(model: nn.Module) -> None:
    """g <- clip(g * alpha_grad_scale) for every learned alpha (once per alpha when shared), called
    before each optimizer step. Not a gradient hook: in a data-parallel run the clip must act on
    the gradient of the whole batch, after DistributedDataParallel has averaged the ranks' ones."""
    seen = set()
    for m in model.modules():
        if isinstance(m, QuantReLU) and isinstance(m.alpha, nn.Parameter) and id(m.alpha) not in seen:
            seen.add(id(m.alpha))
            if m.alpha.grad is not None:
                m.alpha.grad.copy_((m.alpha.grad * m.alpha_grad_scale).clamp(-m.alpha_grad_clip, m.alpha_grad_clip))


@torch.no_grad()
def clamp_learned_alphas(model: nn.Module) -> None:
    """Keep every learned alpha inside its clamp range (called after each optimizer step)."""
    for m in model.modules():
        if isinstance(m, QuantReLU) and isinstance(m.alpha, nn.Parameter):
            m.alpha.clamp_(*m.alpha_clamp)


@dataclass
class ActLayer:
    """The activation factory models receive as ``act_layer``: ``act_layer()`` makes one activation.

    ``bits=None`` gives a float ReLU. ``act_layer(share_with=a)`` makes an activation that shares
    ``a``'s learned alpha when ``share_block_alpha`` is set (used inside ResNet blocks).
    """

    bits: int | None = None
    alpha: float = 1.0
    ste: str = "clipped_relu"
    rounding: str = "ceil"
    learn_alpha: bool = False
    alpha_grad: str = "mean"
    alpha_grad_scale: float = 0.01
    alpha_grad_clip: float = 1.0
    alpha_clamp: tuple = (1e-3, 5.0)
    share_block_alpha: bool = False
    proxy: object = None
    impl: str = "reference"

    def __call__(self, share_with: nn.Module | None = None) -> nn.Module:
        if self.bits is None:  # in place, as torchvision's models: saves an allocation per activation
            return nn.ReLU(inplace=True)
        act = QuantReLU(self.bits, self.alpha, self.ste, self.rounding, self.learn_alpha, self.alpha_grad,
                        self.alpha_grad_scale, self.alpha_grad_clip, self.alpha_clamp,
                        self.proxy).implemented_by(self.impl, inplace=True)  # where the float model's ReLU is in place
        if share_with is not None and self.share_block_alpha:
            act.share_alpha_with(share_with)
        return act
