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


def levels(x: torch.Tensor, alpha: torch.Tensor, bits: int, rounding: str = "ceil") -> torch.Tensor:
    """The level index k = clamp(ceil(x/alpha), 0, 2^b - 1) (or round-to-nearest), in float32.

    One new tensor, the rest in place (on a CPU, fresh large allocations cost more than the arithmetic).
    """
    k = x.float() / alpha.float()
    k = k.ceil_() if rounding == "ceil" else k.add_(0.5).floor_()
    return k.clamp_(0, 2**bits - 1)


def staircase(x: torch.Tensor, alpha: torch.Tensor, bits: int, rounding: str = "ceil") -> torch.Tensor:
    """sigma_alpha(x) = k*alpha with k = levels(x, alpha, bits, rounding).

    The level index k and k*alpha are computed in float32 even under autocast, so which level an
    input falls on never depends on the autocast dtype. The output has x's dtype: in fp32 the
    levels are exactly float32(k*alpha); under bf16 autocast they are k*alpha rounded to bf16
    (relative error <= 2^-9, the same rounding the next bf16 layer applies to any input).
    """
    return levels(x, alpha, bits, rounding).mul_(alpha.float()).to(x.dtype)


def indicator(compare, x: torch.Tensor, bound) -> torch.Tensor:
    """1.0 where compare(x, bound) holds, else 0.0, as a float tensor like x.

    Writing the comparison straight into a float tensor is several times faster on a CPU than a
    bool mask followed by masked_fill / where / a dtype conversion (measured: docs/BENCHMARKS.md).
    """
    return compare(x, bound, out=torch.empty_like(x))


def _alpha_grad(grad_out, x, alpha, bits, rounding, mode):
    """d sigma / d alpha under the chosen proxy, summed into alpha's shape (a scalar)."""
    top = 2**bits - 1
    a = alpha.float()
    g, xf = grad_out.float(), x.float()
    if mode == "mean":  # 0 for x <= 0, 2^(b-1) inside the range, 2^b - 1 beyond
        inside = indicator(torch.gt, xf, 0).mul_(indicator(torch.le, xf, top * a))
        total = 2 ** (bits - 1) * inside.mul_(g).sum() + top * indicator(torch.gt, xf, top * a).mul_(g).sum()
    else:  # "exact": the level index k of the forward pass, the a.e. derivative of k*alpha
        total = levels(xf, a, bits, rounding).mul_(g).sum()
    return total.reshape(alpha.shape).to(alpha.dtype)


def _save_and_quantize(ctx, x, alpha, bits, rounding, alpha_grad):
    ctx.save_for_backward(x, alpha)
    ctx.bits, ctx.rounding, ctx.alpha_grad = bits, rounding, alpha_grad
    return staircase(x, alpha, bits, rounding)


def _coarse_grads(ctx, grad_out, mask_fn):
    """Gradients for (x, alpha, bits, rounding, alpha_grad): grad*mu'(x), and alpha's if learned."""
    x, alpha = ctx.saved_tensors
    mask = mask_fn(x, alpha, ctx.bits)  # mu'(x) as 0/1 floats, or None for "all ones"
    grad_x = grad_out if mask is None else mask.mul_(grad_out).to(grad_out.dtype)
    grad_alpha = None
    if ctx.needs_input_grad[1] and ctx.alpha_grad is not None:
        grad_alpha = _alpha_grad(grad_out, x, alpha, ctx.bits, ctx.rounding, ctx.alpha_grad)
    return grad_x, grad_alpha, None, None, None


def identity_mask(x, alpha, bits):
    return None  # every gradient passes


def relu_mask(x, alpha, bits):
    return indicator(torch.gt, x, 0)


def clipped_relu_mask(x, alpha, bits):
    # compared in float32 like the forward's levels: in bf16, 2.921875 > 15 * 0.1946 would round to "inside"
    xf, top = x.float(), (2**bits - 1) * alpha.float()
    return indicator(torch.gt, xf, 0).mul_(indicator(torch.le, xf, top))


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
