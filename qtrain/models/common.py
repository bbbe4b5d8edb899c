"""Helpers shared by the model definitions."""

from torch import nn


def bn2d(channels: int, affine: bool) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, affine=affine)


def bn1d(features: int, affine: bool) -> nn.BatchNorm1d:
    return nn.BatchNorm1d(features, affine=affine)


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal convs, default linear init: the usual choice for ReLU networks."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
