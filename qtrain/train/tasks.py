"""What a batch's loss and accuracy are: classification (cross-entropy, accuracy) or the teacher
problem's regression (SPEC §5: squared loss, no accuracy). The data bundle says which."""

from __future__ import annotations

import torch.nn.functional as F


class Classification:
    """Cross-entropy loss; accuracy counted on the device (no host sync per batch)."""

    def loss(self, out, y):
        return F.cross_entropy(out, y)

    def correct(self, out, y):
        return (out.argmax(1) == y).sum()


class Regression:
    """Squared loss 1/2 (y - y*)^2 of the teacher problem (SPEC §5); no accuracy."""

    def loss(self, out, y):
        return 0.5 * F.mse_loss(out.float(), y, reduction="mean")

    def correct(self, out, y):
        return None
