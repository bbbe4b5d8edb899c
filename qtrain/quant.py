"""What values are allowed: the quantized activation module and the weight quantizers Q(w).

How weights *move* towards these values (STE / BinaryRelax / BCGD) lives in methods.py.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import nn

from qtrain.errors import ConfigError
from qtrain.ste import ALPHA_GRADS, ROUNDINGS, STES, ProxySTE

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

    def __call__(self, share_with: nn.Module | None = None) -> nn.Module:
        if self.bits is None:  # in place, as torchvision's models: saves an allocation per activation
            return nn.ReLU(inplace=True)
        act = QuantReLU(self.bits, self.alpha, self.ste, self.rounding, self.learn_alpha, self.alpha_grad,
                        self.alpha_grad_scale, self.alpha_grad_clip, self.alpha_clamp, self.proxy)
        if share_with is not None and self.share_block_alpha:
            act.share_alpha_with(share_with)
        return act


# ---------------------------------------------------------------------------------------------
# Weight quantizers Q(w): one scale per layer tensor (SPEC §2). All vectorised.
# ---------------------------------------------------------------------------------------------


def codes_and_scale(project_codes):
    """Wrap a ``w -> (codes, delta)`` rule: it runs on w / max|w| and delta is scaled back.

    The rules are scale-equivariant, and this keeps their sums and squares inside float32 for any
    |w| (1e19 or 1e-21 included). Q(w) is then *defined* as codes * delta, so an exported model's
    integer codes times its scale equal Q(w) exactly.
    """

    @functools.wraps(project_codes)
    def wrapped(w: torch.Tensor, *args, **kwargs):
        s = w.detach().abs().amax()
        s = torch.where(s > 0, s, torch.ones_like(s))
        codes, delta = project_codes(w / s, *args, **kwargs)
        return codes, delta * s

    return wrapped


@codes_and_scale
def binary_codes(w: torch.Tensor):
    """codes = sign(w) in {-1, +1} (sign(0) = +1, so exactly two values), delta = mean|w|."""
    return torch.where(w >= 0, 1.0, -1.0).to(w.dtype), w.abs().mean()


@codes_and_scale
def ternary_codes(w: torch.Tensor):
    """Exact projection onto {0, +-delta}^n: keep the t* largest |w|, t* = argmax (sum_{i<=t}|w|_(i))^2 / t."""
    a = w.abs().flatten()
    sorted_a, order = torch.sort(a, descending=True)
    csum = torch.cumsum(sorted_a, 0)
    t = torch.arange(1, a.numel() + 1, device=w.device, dtype=csum.dtype)
    best = torch.argmax(csum * csum / t)
    delta = csum[best] / (best + 1)
    keep = torch.zeros_like(a).scatter_(0, order, (t <= best + 1).to(a.dtype))
    return (torch.sign(w).flatten() * keep).view_as(w), delta


@codes_and_scale
def ternary_twn_codes(w: torch.Tensor):
    """TWN's approximation: threshold 0.7 * mean|w|, delta = mean of the kept |w|."""
    a = w.abs()
    keep = (a > 0.7 * a.mean()).to(w.dtype)
    delta = (a * keep).sum() / keep.sum().clamp_min(1)
    return torch.sign(w) * keep, delta


@codes_and_scale
def uniform_codes(w: torch.Tensor, bits: int):
    """Exact projection onto {0, +-1, ..., +-m} * delta (m = 2^(bits-1) - 1), over delta and codes.

    As delta falls, weight i's code steps from k to k+1 at delta = |w_i| / (k + 1/2). Between two
    consecutive such breakpoints the codes are fixed and ||w - Q|| is a quadratic in delta with
    minimum at S1/S2 (S1 = <|w|, q>, S2 = <q, q>, both running sums over the sorted breakpoints).
    Checking every interval gives the global optimum in O(n m log(n m)), no iteration.
    """
    m = 2 ** (bits - 1) - 1
    a = w.abs().flatten()
    k = torch.arange(m, device=w.device, dtype=a.dtype)
    breaks = (a[:, None] / (k + 0.5)).flatten()
    order = torch.argsort(breaks, descending=True)
    breaks = breaks[order]
    s1 = torch.cumsum(a[:, None].expand(-1, m).flatten()[order], 0)
    s2 = torch.cumsum((2 * k + 1).expand(a.numel(), -1).flatten()[order], 0)
    lower = torch.cat([breaks[1:], breaks.new_zeros(1)])
    delta = torch.minimum(torch.maximum(s1 / s2, lower), breaks)
    best = torch.argmin(delta * delta * s2 - 2 * delta * s1)
    step = delta[best].clamp_min(1e-30)  # all-zero w: delta 0, codes 0
    q = torch.round(a / step).clamp_(0, m)
    return (torch.sign(w).flatten() * q).view_as(w), step


@codes_and_scale
def uniform_alternating_codes(w: torch.Tensor, bits: int, rounds: int = 10):
    """The authors' rule: delta = max|w| / (m + 1/2), then alternate codes = round(|w|/delta) and
    delta = <|w|,q>/<q,q>. Faster than :func:`uniform` but only a local optimum."""
    m = 2 ** (bits - 1) - 1
    a = w.abs()
    delta = a.max().clamp_min(1e-12) / (m + 0.5)
    for _ in range(rounds):
        q = torch.round(a / delta).clamp_(0, m)
        delta = ((a * q).sum() / (q * q).sum().clamp_min(1e-12)).clamp_min(1e-12)
    return torch.sign(w) * torch.round(a / delta).clamp_(0, m), delta


def _projection(codes_fn):
    """Q(w) = codes * delta from a codes rule."""

    @functools.wraps(codes_fn)
    def project(w: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        codes, delta = codes_fn(w, *args, **kwargs)
        return codes * delta

    return project


binary = _projection(binary_codes)
ternary = _projection(ternary_codes)
ternary_twn = _projection(ternary_twn_codes)
uniform = _projection(uniform_codes)
uniform_alternating = _projection(uniform_alternating_codes)


WQUANT_RULES = ("exact", "approx")


def make_weight_quantizer(bits: int | None, rule: str = "exact"):
    """The Q(w) for ``wbits``: 1 binary, 2 ternary, >= 3 symmetric uniform.

    ``rule="exact"``: the exact projections; ``"approx"``: TWN's threshold for ternary and the
    authors' alternating rounds for k bits (faster, not projections).
    """
    codes = make_code_quantizer(bits, rule)
    return None if codes is None else _projection(codes)


def make_code_quantizer(bits: int | None, rule: str = "exact"):
    """The ``w -> (integer codes as floats, delta)`` rule behind :func:`make_weight_quantizer`."""
    if rule not in WQUANT_RULES:
        raise ConfigError(f"wquant must be one of {', '.join(WQUANT_RULES)}, got {rule!r}.")
    if bits is None:
        return None
    if bits == 1:
        return binary_codes
    if bits == 2:
        return ternary_codes if rule == "exact" else ternary_twn_codes
    return functools.partial(uniform_codes if rule == "exact" else uniform_alternating_codes, bits=bits)


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
