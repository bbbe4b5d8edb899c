"""Learning-rate schedules that torch.optim does not ship ready-made for a config file.

Schedulers step once per epoch by default (``sched.interval: epoch``, the papers' MultiStepLR);
``sched.interval: step`` steps them after every optimizer step (warm-up, OneCycle, cosine with
warm-up). For per-step schedules whose length is ``total_steps: null`` in the config, build.py fills
in epochs x batches per epoch.
"""

from __future__ import annotations

import math

import torch


def cosine_with_warmup(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
                       min_factor: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0 to the base lr over ``warmup_steps``, then a cosine decay to
    ``min_factor`` x base lr at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
