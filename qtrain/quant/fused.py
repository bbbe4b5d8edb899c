"""The fused quantized activation (``act.impl=fused``): one pass forward, one pass backward.

The forward pass computes the staircase and, for the backward, a 2-bit code per element (four to a
byte: x <= 0, inside the range, beyond it) -- a sixteenth of the float input the reference keeps.
The backward pass turns code and incoming gradient into grad_x and, with a learned alpha, the two
masked gradients whose sums make alpha's gradient, in the same pass, instead of building full-size
0/1 masks and multiplying them in further passes.
The kernels are a ``torch.library`` custom op (``torch.ops.qtrain.staircase_forward/backward``,
fused_kernel.cpp), compiled for this machine on first use by torch.utils.cpp_extension (about 20 s
on the 2-core VM; cached in $TORCH_EXTENSIONS_DIR, by default ~/.cache/torch_extensions). Inside a
model the forward writes the levels over its input, as the float network's in-place ReLU does.

Levels, masks, grad_x and the alpha gradient are bitwise the reference's (the same float32 operations
in the same order, and alpha's sums taken by torch.sum over the same values in the same memory layout:
tests/test_fused.py), so act.impl is not part of a run's identity. Where there is no kernel -- CUDA
tensors, bf16 activations, ``act.alpha_grad=exact`` -- or no compiler, the compact estimators
(compact.py) run instead: the same results, one byte kept per element.
"""

from __future__ import annotations

import logging
from functools import cache
from pathlib import Path

import torch

from qtrain.quant.compact import CompactSTE

log = logging.getLogger("qtrain")

#: -march=native: this machine's vector width; -ffp-contract=off: no fused multiply-add (the reference has
#: none); -fno-trapping-math lets the compares vectorise (it changes no value, only which FP exceptions
#: may be raised); -fopenmp: at::parallel_for is OpenMP in PyTorch's CPU builds, and without the flag
#: it silently runs on one thread (the same libgomp.so.1 as torch's is used at run time).
CFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-trapping-math", "-fopenmp"]

_STE_CODE = {"identity": 0, "relu": 1, "clipped_relu": 2}  # fused_kernel.cpp's ste argument


@cache
def kernels_loaded() -> bool:
    """Build (once per machine) and load the kernels; False, with one warning, where that fails."""
    # (its import warns "No CUDA runtime is found" on every CPU-only machine: nothing here needs CUDA)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils import cpp_extension

    try:
        cpp_extension.load(name="qtrain_fused_act", sources=[str(Path(__file__).with_name("fused_kernel.cpp"))],
                           extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"], is_python_module=False,
                           verbose=False)
    except Exception as e:  # no compiler, no headers: compact.py gives the same results
        log.warning("act.impl=fused: the kernels could not be built (%s); using act.impl=compact instead "
                    "(the same results, more memory and time).", str(e).strip().splitlines()[-1][:200])
        return False
    _register_shapes()
    return True


def _register_shapes() -> None:
    """Shape-only versions of the ops, so that torch.compile can trace through them (compile=true)."""

    @torch.library.register_fake("qtrain::staircase_forward")
    def _forward(x, alpha, bits, ceil_rounding, keep_codes):
        return torch.empty_like(x), x.new_empty(((x.numel() + 3) // 4 if keep_codes else 0,), dtype=torch.uint8)

    @torch.library.register_fake("qtrain::staircase_forward_")
    def _forward_(x, alpha, bits, ceil_rounding, keep_codes):
        return x.new_empty(((x.numel() + 3) // 4 if keep_codes else 0,), dtype=torch.uint8)

    @torch.library.register_fake("qtrain::staircase_backward")
    def _backward(grad, codes, ste, alpha_terms):
        def full(wanted):
            return torch.empty_like(grad) if wanted else grad.new_empty((0,))

        return full(ste != 0), full(alpha_terms and ste != 2), full(alpha_terms)


def has_kernel(x: torch.Tensor, alpha_grad: str | None) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32 and alpha_grad in (None, "mean")
            and kernels_loaded())


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class FusedSTE(torch.autograd.Function):
    """The identity / relu / clipped_relu estimator (``ste``) in one kernel each way."""

    @staticmethod
    def forward(ctx, x, alpha, bits, rounding, alpha_grad, ste, inplace):
        ctx.bits, ctx.ste, ctx.alpha_grad = bits, ste, alpha_grad
        ctx.memory_format = _memory_format(x)
        keep = ste != "identity" or alpha_grad is not None
        if inplace and can_write_over(x, ctx.memory_format):  # as an in-place ReLU: no new tensor
            codes = torch.ops.qtrain.staircase_forward_(x, alpha.detach(), bits, rounding == "ceil", keep)
            ctx.mark_dirty(x)  # (autograd then refuses a backward that needs x's old values)
            y = x
        else:
            y, codes = torch.ops.qtrain.staircase_forward(x.contiguous(memory_format=ctx.memory_format),
                                                          alpha.detach(), bits, rounding == "ceil", keep)
        ctx.save_for_backward(alpha, codes)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        alpha, codes = ctx.saved_tensors
        want_alpha = ctx.needs_input_grad[1] and ctx.alpha_grad is not None
        if ctx.ste == "identity" and not want_alpha:
            return grad_out, None, None, None, None, None, None
        g = grad_out.contiguous(memory_format=ctx.memory_format)
        grad_x, inside, beyond = torch.ops.qtrain.staircase_backward(g, codes, _STE_CODE[ctx.ste], want_alpha)
        if ctx.ste == "identity":
            grad_x = grad_out
        grad_alpha = None
        if want_alpha:  # the "mean" proxy, summed as the reference sums it: 2^(b-1) inside the range, 2^b - 1 beyond
            inside = grad_x if ctx.ste == "clipped_relu" else inside  # (there the mask is "inside")
            total = 2 ** (ctx.bits - 1) * inside.sum() + (2**ctx.bits - 1) * beyond.sum()
            grad_alpha = total.reshape(alpha.shape).to(alpha.dtype)
        return grad_x, grad_alpha, None, None, None, None, None


def can_write_over(x: torch.Tensor, memory_format) -> bool:
    """x is an intermediate of this forward (not a leaf, not a view) and dense: the levels may replace it."""
    return not x.is_leaf and not x._is_view() and x.is_contiguous(memory_format=memory_format)


def fused_staircase(x, alpha, bits, rounding, alpha_grad, ste, inplace=False):
    """The activation under ``act.impl=fused``: the kernels where they exist, else compact.py. ``inplace``:
    the levels may be written over x (the models ask for it where their float ReLUs are in place)."""
    if has_kernel(x, alpha_grad):
        return FusedSTE.apply(x, alpha, bits, rounding, alpha_grad, ste, inplace)
    return CompactSTE.apply(x, alpha, bits, rounding, alpha_grad, ste)
