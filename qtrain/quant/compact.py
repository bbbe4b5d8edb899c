"""The straight-through estimators with a compact saved state (``act.impl=compact``): the forward pass
keeps, for the backward, one byte per element saying which interval the input fell in, instead of the
float input itself (4 bytes, or 2 under bf16). The masks of the relu and clipped_relu estimators and
the "mean" alpha gradient are functions of that interval and of the incoming gradient alone:

    region 0   x <= 0                      relu mask 0, clipped_relu mask 0, d sigma / d alpha 0
    region 1   0 < x <= (2^b - 1) alpha    relu mask 1, clipped_relu mask 1, 2^(b-1)
    region 2   x > (2^b - 1) alpha         relu mask 1, clipped_relu mask 0, 2^b - 1

The "exact" alpha gradient needs the level index k too (a second small integer tensor); identity
without a learned alpha keeps nothing. Each region is decided with the very comparisons of the
reference estimators (qtrain/quant/ste.py), in float32, so levels, masks and alpha gradients are
bitwise those of ``act.impl=reference`` (tests/test_compact.py), and so is training.

The forward and backward are still several elementwise passes in eager PyTorch; fused.py does each in one
kernel pass (and falls back to these estimators where it has no kernel: CUDA, bf16, alpha_grad="exact").
"""

from __future__ import annotations

import torch

from qtrain.quant.ste import identity_mask, levels, staircase


def regions(x: torch.Tensor, alpha: torch.Tensor, bits: int) -> torch.Tensor:
    """0 (x <= 0), 1 (inside the staircase's range) or 2 (beyond it), as uint8."""
    xf, top = x.float(), (2**bits - 1) * alpha.float()
    return torch.gt(xf, 0).to(torch.uint8).add_(torch.gt(xf, top).to(torch.uint8))


def _level_dtype(bits: int) -> torch.dtype:
    return torch.uint8 if bits <= 8 else torch.int32


class CompactSTE(torch.autograd.Function):
    """One of the identity / relu / clipped_relu estimators (``ste``), keeping only the regions (and the
    levels for alpha_grad="exact") for the backward."""

    @staticmethod
    def forward(ctx, x, alpha, bits, rounding, alpha_grad, ste):
        ctx.bits, ctx.rounding, ctx.alpha_grad, ctx.ste = bits, rounding, alpha_grad, ste
        ctx.x_dtype = x.dtype
        keep = []
        if ste != "identity" or alpha_grad is not None:
            keep.append(regions(x, alpha, bits))
        if alpha_grad == "exact":
            keep.append(levels(x, alpha, bits, rounding).to(_level_dtype(bits)))
        ctx.save_for_backward(alpha, *keep)
        return staircase(x, alpha, bits, rounding)

    @staticmethod
    def backward(ctx, grad_out):
        alpha, *kept = ctx.saved_tensors
        region = kept[0] if kept else None
        if ctx.ste == "identity":
            mask = identity_mask(None, alpha, ctx.bits)
        elif ctx.ste == "relu":
            mask = torch.ge(region, 1).to(torch.float32)
        else:  # clipped_relu
            mask = torch.eq(region, 1).to(torch.float32)
        # as the reference: the 0/1 mask times the gradient (0 * g keeps g's sign), then g's dtype
        grad_x = grad_out if mask is None else mask.mul_(grad_out).to(grad_out.dtype)
        grad_alpha = None
        if ctx.needs_input_grad[1] and ctx.alpha_grad is not None:
            grad_alpha = _alpha_grad(grad_out, region, kept[1] if len(kept) > 1 else None, alpha, ctx.bits,
                                     ctx.alpha_grad)
        return grad_x, grad_alpha, None, None, None, None


def _alpha_grad(grad_out, region, level, alpha, bits, mode):
    """d sigma / d alpha summed into alpha's shape, from the regions (the sums of the reference, in its order)."""
    g = grad_out.float()
    if mode == "mean":
        inside = torch.eq(region, 1).to(torch.float32)
        beyond = torch.eq(region, 2).to(torch.float32)
        total = 2 ** (bits - 1) * inside.mul_(g).sum() + (2**bits - 1) * beyond.mul_(g).sum()
    else:
        total = level.to(torch.float32).mul_(g).sum()
    return total.reshape(alpha.shape).to(alpha.dtype)
