"""Batch norm over the global batch of a data-parallel run (``sync_bn=true``).

On CUDA this is PyTorch's own ``nn.SyncBatchNorm``. PyTorch's SyncBatchNorm refuses CPU tensors,
so on the CPU (Gloo: the equivalence tests, a CPU cluster) :class:`CpuSyncBatchNorm` does the same
job with public pieces: each rank's per-channel sums, all-reduced with the autograd-aware
``torch.distributed.nn.functional.all_reduce`` (its backward all-reduces the gradients, so the
backward pass is also that of the global batch).
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed.nn.functional as dist_fn
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

# torch.distributed.nn.functional.all_reduce (public, documented, autograd-aware) warns that it is deprecated in
# favour of torch.distributed._functional_collectives, a private module: we keep the public one, without the warning.
warnings.filterwarnings("ignore", message="torch.distributed.nn.functional.all_reduce is deprecated",
                        category=FutureWarning)


class CpuSyncBatchNorm(_BatchNorm):
    """Training-mode statistics of the batch across all ranks; evaluation uses the running ones.

    The sums are taken in float64: the mean and variance of the global batch then agree with what
    a single process computes on the whole batch to float32 rounding (PyTorch's CPU kernel also
    accumulates in double).
    """

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x):
        self._check_input_dim(x)
        if not self.training and self.track_running_stats:
            return nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False,
                                            0.0, self.eps)
        channels = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        xd = x.double()
        local = torch.cat([xd.sum(dims), (xd * xd).sum(dims), xd.new_full((channels,), x.numel() / channels)])
        total = dist_fn.all_reduce(local)
        s, ss, n = total[:channels], total[channels:2 * channels], total[2 * channels]
        mean = s / n
        var = (ss / n - mean * mean).clamp_min(0)
        shape = (1, channels) + (1,) * (x.dim() - 2)
        y = ((xd - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)).to(x.dtype)
        if self.weight is not None:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
                unbiased = var * (n / (n - 1).clamp_min(1))
                self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        return y


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every batch norm of ``module`` becomes a synchronised one (in place; the parameters and
    buffers are the same tensors, so an optimizer built before keeps working)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if isinstance(child, _BatchNorm):
            new = CpuSyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                   child.track_running_stats)
            if child.affine:
                new.weight, new.bias = child.weight, child.bias
            if child.track_running_stats:
                new.running_mean, new.running_var = child.running_mean, child.running_var
                new.num_batches_tracked = child.num_batches_tracked
            new.train(child.training)
            setattr(module, name, new)
        else:
            convert_sync_batchnorm(child, device)
    return module
