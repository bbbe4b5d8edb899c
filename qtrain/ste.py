"""Straight-through estimators for the quantized ReLU (SPEC §1).

The forward pass of every estimator is the same b-bit staircase sigma_alpha(x); they differ only
in the derivative mu'(x) of the proxy function used in the backward pass:

    identity      mu(x) = x                      mu'(x) = 1
    relu          mu(x) = max(x, 0)              mu'(x) = 1{x > 0}
    clipped_relu  mu(x) = min(max(x,0), n*alpha) mu'(x) = 1{0 < x <= n*alpha},  n = 2^b - 1
    proxy         any monotone mu given by the user; mu' taken by autograd ([CG]'s class)

Each estimator is one ``torch.autograd.Function``. Its backward also returns a gradient for the
resolution alpha when alpha is learned ([BCGD]); which proxy d sigma / d alpha to use is chosen
by ``alpha_grad`` ("mean": the authors' default, "exact": the a.e.-exact one).

>>> x = torch.tensor([-1.0, 0.5, 2.0], requires_grad=True)
>>> alpha = torch.tensor(1.0)
>>> ClippedReLUSTE.apply(x, alpha, 1, "ceil", None).sum().backward()
>>> x.grad
tensor([0., 1., 0.])
"""

from __future__ import annotations

import torch

ROUNDINGS = ("ceil", "nearest")
ALPHA_GRADS = ("mean", "exact")


def staircase(x: torch.Tensor, alpha: torch.Tensor, bits: int, rounding: str = "ceil") -> torch.Tensor:
    """sigma_alpha(x) = k*alpha with k = clamp(ceil(x/alpha), 0, 2^b - 1) (or round-to-nearest).

    Computed in float32 even under autocast, so the levels are exactly k*alpha.
    """
    top = 2**bits - 1
    scaled = x.float() / alpha.float()
    k = torch.ceil(scaled) if rounding == "ceil" else torch.floor(scaled + 0.5)
    return (k.clamp_(0, top) * alpha.float()).to(x.dtype)


def _alpha_grad(grad_out, x, alpha, bits, mode):
    """d sigma / d alpha under the chosen proxy, summed into alpha's shape (a scalar)."""
    top = 2**bits - 1
    xa = x.float()
    a = alpha.float()
    if mode == "mean":  # 0 for x <= 0, 2^(b-1) inside the range, 2^b - 1 beyond
        d = torch.where(xa <= 0, 0.0, torch.where(xa <= top * a, float(2 ** (bits - 1)), float(top)))
    else:  # "exact": the level index ceil(x/alpha), clamped; the a.e. derivative of k*alpha
        d = torch.ceil(xa / a).clamp_(0, top)
    return (grad_out.float() * d).sum().reshape(alpha.shape).to(alpha.dtype)


def _save_and_quantize(ctx, x, alpha, bits, rounding, alpha_grad):
    ctx.save_for_backward(x, alpha)
    ctx.bits, ctx.alpha_grad = bits, alpha_grad
    return staircase(x, alpha, bits, rounding)


def _coarse_grads(ctx, grad_out, mask_fn):
    """Gradients for (x, alpha, bits, rounding, alpha_grad): grad*mu'(x), and alpha's if learned."""
    x, alpha = ctx.saved_tensors
    grad_x = grad_out * mask_fn(x, alpha, ctx.bits).to(grad_out.dtype)
    grad_alpha = None
    if ctx.needs_input_grad[1] and ctx.alpha_grad is not None:
        grad_alpha = _alpha_grad(grad_out, x, alpha, ctx.bits, ctx.alpha_grad)
    return grad_x, grad_alpha, None, None, None


def identity_mask(x, alpha, bits):
    return torch.ones_like(x)


def relu_mask(x, alpha, bits):
    return x > 0


def clipped_relu_mask(x, alpha, bits):
    return (x > 0) & (x <= (2**bits - 1) * alpha)


class IdentitySTE(torch.autograd.Function):
    """mu'(x) = 1: the gradient passes unchanged."""

    forward = staticmethod(_save_and_quantize)

    @staticmethod
    def backward(ctx, grad_out):
        return _coarse_grads(ctx, grad_out, identity_mask)


class ReLUSTE(torch.autograd.Function):
    """mu'(x) = 1{x > 0}."""

    forward = staticmethod(_save_and_quantize)

    @staticmethod
    def backward(ctx, grad_out):
        return _coarse_grads(ctx, grad_out, relu_mask)


class ClippedReLUSTE(torch.autograd.Function):
    """mu'(x) = 1{0 < x <= (2^b - 1) alpha}."""

    forward = staticmethod(_save_and_quantize)

    @staticmethod
    def backward(ctx, grad_out):
        return _coarse_grads(ctx, grad_out, clipped_relu_mask)


class ProxySTE(torch.autograd.Function):
    """Any user-supplied proxy mu: the backward uses mu'(x), computed by autograd."""

    @staticmethod
    def forward(ctx, x, alpha, bits, rounding, proxy):
        ctx.save_for_backward(x)
        ctx.proxy = proxy
        return staircase(x, alpha, bits, rounding)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            xd = x.detach().requires_grad_(True)
            (dmu,) = torch.autograd.grad(ctx.proxy(xd).sum(), xd)
        return grad_out * dmu, None, None, None, None


STES = {"identity": IdentitySTE, "relu": ReLUSTE, "clipped_relu": ClippedReLUSTE}
