"""ResNets: ResNet-20 for CIFAR (He et al. 2016, option-A shortcuts) and ResNet-18.

Blocks are conv-BN-act-conv-BN, then the shortcut is added and the second activation applied.
``act_layer(share_with=first)`` lets the two activations of a block share one learned alpha
(the [BCGD] code's ResNet block) when the activation config asks for it.
"""

import torch.nn.functional as F
from torch import nn

from qtrain.models.common import bn2d, init_weights


class ShortcutA(nn.Module):
    """Option A: subsample spatially and zero-pad the new channels (no parameters)."""

    def __init__(self, in_planes, planes, stride):
        super().__init__()
        self.stride, self.extra = stride, planes - in_planes

    def forward(self, x):
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


def shortcut_b(in_planes, planes, stride, affine):
    """Option B: 1x1 conv + BN projection (torchvision's ResNet-18)."""
    return nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), bn2d(planes, affine))


class BasicBlock(nn.Module):
    def __init__(self, in_planes, planes, stride, act_layer, norm_affine, shortcut):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = bn2d(planes, norm_affine)
        self.act1 = act_layer()
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = bn2d(planes, norm_affine)
        self.act2 = act_layer(share_with=self.act1)
        if stride == 1 and in_planes == planes:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = ShortcutA(in_planes, planes, stride)
        else:
            self.shortcut = shortcut_b(in_planes, planes, stride, norm_affine)

    def forward(self, x):
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class ResNet(nn.Module):
    """A ResNet of BasicBlocks.

    stem="cifar": conv3x3 (stride 1), no max-pool; stem="imagenet": conv7x7/2 + max-pool;
    stem="auto" picks "cifar" for inputs of at most 64 pixels.
    """

    def __init__(self, num_classes, input_shape, act_layer, norm_affine=False, blocks=(3, 3, 3),
                 widths=(16, 32, 64), shortcut="A", stem="auto"):
        super().__init__()
        if stem == "auto":
            stem = "cifar" if input_shape[-1] <= 64 else "imagenet"
        c0 = widths[0]
        if stem == "cifar":
            self.stem = nn.Sequential(nn.Conv2d(input_shape[0], c0, 3, padding=1, bias=False), bn2d(c0, norm_affine),
                                      act_layer())
        else:
            self.stem = nn.Sequential(nn.Conv2d(input_shape[0], c0, 7, stride=2, padding=3, bias=False),
                                      bn2d(c0, norm_affine), act_layer(), nn.MaxPool2d(3, stride=2, padding=1))
        stages, in_planes = [], c0
        for i, (n, planes) in enumerate(zip(blocks, widths)):
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                stages.append(BasicBlock(in_planes, planes, stride, act_layer, norm_affine, shortcut))
                in_planes = planes
        self.layers = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(in_planes, num_classes)
        init_weights(self)

    def forward(self, x):
        return self.fc(self.pool(self.layers(self.stem(x))))


def resnet20(num_classes, input_shape, act_layer, norm_affine=False, shortcut="A"):
    return ResNet(num_classes, input_shape, act_layer, norm_affine, (3, 3, 3), (16, 32, 64), shortcut, "cifar")


def resnet18(num_classes, input_shape, act_layer, norm_affine=True, stem="auto"):
    return ResNet(num_classes, input_shape, act_layer, norm_affine, (2, 2, 2, 2), (64, 128, 256, 512), "B", stem)
