"""The weight quantizers Q(w): one scale per layer tensor (SPEC §2), all vectorised. Binary (1 bit),
ternary (2 bits) and symmetric uniform k-bit, each as the exact projection (the default) or the
faster approximation the papers' code uses (``wquant=approx``)."""

from __future__ import annotations

import functools

import torch

from qtrain.errors import ConfigError


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
