"""What values are allowed: the quantized activation module and the weight quantizers Q(w).

How weights *move* towards these values (STE / BinaryRelax / BCGD) lives in methods.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from qtrain.errors import ConfigError
from qtrain.ste import ROUNDINGS, STES, ProxySTE

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
    buffer when fixed ([STE]) and a Parameter when learned ([BCGD]); a learned alpha gets its
    gradient scaled and clipped by a hook, and is clamped after each optimizer step by
    :func:`clamp_learned_alphas`. ``enabled=False`` turns the module into a plain ReLU.
    """

    def __init__(self, bits: int, alpha: float, ste: str = "clipped_relu", rounding: str = "ceil",
                 learn_alpha: bool = False, alpha_grad: str = "mean", alpha_grad_scale: float = 0.01,
                 alpha_grad_clip: float = 1.0, alpha_clamp=(1e-3, 5.0), proxy=None):
        super().__init__()
        if ste not in STES and ste != "proxy":
            raise ConfigError(f"unknown ste {ste!r}; choose one of {sorted(STES) + ['proxy']}.")
        if rounding not in ROUNDINGS:
            raise ConfigError(f"act.rounding must be one of {ROUNDINGS}, got {rounding!r}.")
        self.bits, self.ste, self.rounding = int(bits), ste, rounding
        self.proxy = proxy
        self.enabled = True
        self.alpha_grad = alpha_grad if learn_alpha else None
        self.alpha_clamp = tuple(alpha_clamp)
        value = torch.tensor(float(alpha))
        if learn_alpha:
            self.alpha = nn.Parameter(value)
            scale, clip = alpha_grad_scale, alpha_grad_clip
            self.alpha.register_hook(lambda g: (g * scale).clamp(-clip, clip))
        else:
            self.register_buffer("alpha", value)

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
        return STES[self.ste].apply(x, self.alpha, self.bits, self.rounding, self.alpha_grad)

    def extra_repr(self):
        kind = "learned" if isinstance(self.alpha, nn.Parameter) else "fixed"
        return f"bits={self.bits}, alpha={float(self.alpha):.4g} ({kind}), ste={self.ste}, rounding={self.rounding}"


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

    def __call__(self, share_with: nn.Module | None = None) -> nn.Module:
        if self.bits is None:
            return nn.ReLU(inplace=False)
        act = QuantReLU(self.bits, self.alpha, self.ste, self.rounding, self.learn_alpha, self.alpha_grad,
                        self.alpha_grad_scale, self.alpha_grad_clip, self.alpha_clamp, self.proxy)
        if share_with is not None and self.share_block_alpha:
            act.share_alpha_with(share_with)
        return act


# ---------------------------------------------------------------------------------------------
# Weight quantizers Q(w): one scale per layer tensor (SPEC §2). All vectorised.
# ---------------------------------------------------------------------------------------------


def binary(w: torch.Tensor) -> torch.Tensor:
    """Q(w) = mean|w| * sign(w), with sign(0) = +1 so that exactly two values appear."""
    return w.abs().mean() * torch.where(w >= 0, 1.0, -1.0).to(w.dtype)


def ternary(w: torch.Tensor) -> torch.Tensor:
    """Exact projection onto {0, +-delta}^n: keep the t* largest |w|, t* = argmax (sum_{i<=t}|w|_(i))^2 / t."""
    a = w.abs().flatten()
    sorted_a, order = torch.sort(a, descending=True)
    csum = torch.cumsum(sorted_a, 0)
    t = torch.arange(1, a.numel() + 1, device=w.device, dtype=csum.dtype)
    best = torch.argmax(csum * csum / t)
    delta = csum[best] / (best + 1)
    keep = torch.zeros_like(a).scatter_(0, order, (t <= best + 1).to(a.dtype))
    return (delta * torch.sign(w).flatten() * keep).view_as(w)


def ternary_twn(w: torch.Tensor) -> torch.Tensor:
    """TWN's approximation: threshold 0.7 * mean|w|, delta = mean of the kept |w|."""
    a = w.abs()
    keep = (a > 0.7 * a.mean()).to(w.dtype)
    delta = (a * keep).sum() / keep.sum().clamp_min(1)
    return delta * torch.sign(w) * keep


def uniform(w: torch.Tensor, bits: int, rounds: int = 10) -> torch.Tensor:
    """Projection onto {0, +-1, ..., +-m} * delta, m = 2^(bits-1) - 1, over delta and the codes.

    Alternating minimisation (codes = round(|w|/delta), then delta = <|w|,q>/<q,q>) as in the
    authors' code, started from their initialisation max|w|/(m + 1/2) and from a few other scales
    at once (batched), keeping the best: one start alone can stop at a poor local optimum.
    """
    m = 2 ** (bits - 1) - 1
    a = w.abs().flatten()
    amax = a.max().clamp_min(1e-12)
    divisors = torch.tensor([m + 0.5, m, 0.5 * m, 0.75 * m, 1.25 * m, 1.5 * m, 2.0 * m, 3.0 * m],
                            device=w.device, dtype=a.dtype)
    delta = (amax / divisors)[:, None]  # [starts, 1]
    for _ in range(rounds):
        q = torch.round(a / delta).clamp_(0, m)
        delta = ((a * q).sum(1, keepdim=True) / (q * q).sum(1, keepdim=True).clamp_min(1e-12)).clamp_min(1e-12)
    q = torch.round(a / delta).clamp_(0, m)
    err = ((a - q * delta) ** 2).sum(1)
    best = torch.argmin(err)
    return (torch.sign(w).flatten() * q[best] * delta[best]).view_as(w)


def make_weight_quantizer(bits: int | None, ternary_rule: str = "exact"):
    """The Q(w) for ``wbits``: 1 binary, 2 ternary (exact or "twn"), >= 3 symmetric uniform."""
    if bits is None:
        return None
    if bits == 1:
        return binary
    if bits == 2:
        return {"exact": ternary, "twn": ternary_twn}[ternary_rule]
    return lambda w: uniform(w, bits)


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
