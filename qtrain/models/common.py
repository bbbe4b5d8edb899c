"""Helpers shared by the model definitions."""

import torch
import torch.nn.functional as F
from torch import nn


class _UnitAffine:
    """Batch norm without learned affine parameters, computed by the affine kernel with a constant
    scale of 1 and shift of 0.

    Same function as ``affine=False`` (x * 1 + 0 is exact). Why: PyTorch's CPU batch-norm kernels
    are faster with weight and bias given than without (ResNet-20 step on this CPU: 1.13x ->
    1.02x a plain affine ResNet-20; docs/BENCHMARKS.md). The constants are non-persistent
    buffers, so state dicts are exactly those of ``affine=False`` (old checkpoints load).
    """

    def _add_unit_affine(self, channels: int) -> None:
        self.register_buffer("unit_scale", torch.ones(channels), persistent=False)
        self.register_buffer("unit_shift", torch.zeros(channels), persistent=False)

    def forward(self, x):
        self._check_input_dim(x)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # a cumulative average over the batches so far, as nn.BatchNorm's
                momentum = 1.0 / float(self.num_batches_tracked)
        return F.batch_norm(x, self.running_mean, self.running_var, self.unit_scale, self.unit_shift,
                            self.training or not self.track_running_stats, momentum, self.eps)


class UnitAffineBatchNorm2d(_UnitAffine, nn.BatchNorm2d):
    def __init__(self, channels: int):
        super().__init__(channels, affine=False)
        self._add_unit_affine(channels)


class UnitAffineBatchNorm1d(_UnitAffine, nn.BatchNorm1d):
    def __init__(self, features: int):
        super().__init__(features, affine=False)
        self._add_unit_affine(features)


def bn2d(channels: int, affine: bool) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, affine=True) if affine else UnitAffineBatchNorm2d(channels)


def bn1d(features: int, affine: bool) -> nn.BatchNorm1d:
    return nn.BatchNorm1d(features, affine=True) if affine else UnitAffineBatchNorm1d(features)


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal convs, default linear init: the usual choice for ReLU networks."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
