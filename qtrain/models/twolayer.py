"""The two-linear-layer model of [STE] §2-3 (SPEC §5): y = v^T sigma(Z w), sigma(x) = 1{x > 0}.

Z is an m x n Gaussian input; w in R^n is shared by the m rows and v in R^m. sigma is part of the
model's definition, so the activation is always the 1-bit staircase with alpha = 1 (exactly
1{x > 0}); only the straight-through estimator comes from the config.
"""

import dataclasses

import torch
from torch import nn


class TwoLayer(nn.Module):
    def __init__(self, num_classes, input_shape, act_layer):
        super().__init__()
        m, n = input_shape
        self.w = nn.Linear(n, 1, bias=False)
        self.act = dataclasses.replace(act_layer, bits=1, alpha=1.0, learn_alpha=False)()
        self.v = nn.Linear(m, 1, bias=False)
        with torch.no_grad():  # start away from the origin, w on the unit sphere
            self.w.weight /= self.w.weight.norm()

    def forward(self, z):  # z: [B, m, n] -> [B]
        return self.v(self.act(self.w(z).squeeze(-1))).squeeze(-1)
