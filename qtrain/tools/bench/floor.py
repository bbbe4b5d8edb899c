"""The floor of `qtrain-bench`: a plain PyTorch ResNet-20 float training step, none of qtrain's code.

The textbook CIFAR ResNet-20 (He et al. 2016, option-A shortcuts): nn.Conv2d, affine
nn.BatchNorm2d, in-place ReLU, channels_last, SGD(momentum 0.9, weight decay 1e-4), cross
entropy. Every qtrain variant's step is also given as a ratio to this one, measured in the same
run, so what qtrain's machinery costs is visible apart from what the network costs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.stride, self.extra = stride, cout - cin

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        if self.stride != 1 or self.extra:
            x = F.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
        return F.relu(out + x, inplace=True)


class PlainResNet20(nn.Module):
    def __init__(self, num_classes=10, in_channels=3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(True))
        blocks, cin = [], 16
        for stage, cout in enumerate((16, 32, 64)):
            for j in range(3):
                blocks.append(_Block(cin, cout, 2 if stage > 0 and j == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1).flatten(1))


def plain_step(x: torch.Tensor, y: torch.Tensor, device: torch.device, num_classes: int = 10):
    """``step(n)``: n plain training steps on the batch (x, y)."""
    model = PlainResNet20(num_classes, x.shape[1]).to(device).to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)

    def step(n):
        for _ in range(n):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return step
