"""``schedule_scale``: run a recipe at a fraction (or a multiple) of its length, and say so.

A paper's recipe is written for its full length (e.g. [STE]'s CIFAR schedule: 200 epochs, LR
milestones 80/140, BinaryRelax's phase II from epoch 150). ``schedule_scale=0.1`` turns that into
20 epochs with milestones 8/14 and phase II from epoch 15, and speeds BinaryRelax's lambda growth
so that lambda reaches the same value at the phase switch. Every epoch count of the recipe moves
together; nothing else (lr, batch size, weight decay) changes.

The scaled run records ``schedule_scale`` in result.json and in its fingerprint, and qtrain-report
prints it beside every number, so a scaled run is never shown as a full reproduction.
"""

from __future__ import annotations

import copy

from omegaconf import DictConfig, ListConfig, open_dict

from qtrain.errors import ConfigError


def _scaled_epoch(value: int, scale: float, minimum: int = 1) -> int:
    return max(minimum, int(round(value * scale)))


def check_scale(scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale <= 10:
        raise ConfigError(f"schedule_scale must be a number in (0, 10] (1 = the recipe as written, 0.1 = a tenth of "
                          f"its epochs, milestones and phase switch), got {scale!r}.")
    return float(scale)


def scale_schedule(cfg: DictConfig) -> DictConfig:
    """A copy of ``cfg`` with its epoch counts multiplied by ``cfg.schedule_scale`` (rounded, at least 1).

    Scaled: epochs; sched.milestones (MultiStepLR), sched.step_size (StepLR); method.phase2_epoch
    and method.growth (BinaryRelax: lambda at the switch unchanged). sched.T_max follows epochs
    through its ``${epochs}`` interpolation.
    """
    scale = check_scale(cfg.get("schedule_scale", 1))
    if scale == 1:
        return cfg
    out = copy.deepcopy(cfg)
    with open_dict(out):
        out.epochs = _scaled_epoch(cfg.epochs, scale)
        sched = out.get("sched") or {}
        if isinstance(sched.get("milestones"), ListConfig):
            out.sched.milestones = sorted({_scaled_epoch(m, scale) for m in cfg.sched.milestones})
        if isinstance(sched.get("step_size"), int):
            out.sched.step_size = _scaled_epoch(cfg.sched.step_size, scale)
        method = cfg.get("method") or {}
        if isinstance(method.get("phase2_epoch"), int):
            old = method.phase2_epoch
            new = _scaled_epoch(old, scale, minimum=0)
            out.method.phase2_epoch = new
            if method.get("growth") is not None and new > 0:
                # lambda = lambda0 * growth^epoch in phase I: same lambda at the phase switch
                out.method.growth = float(method.growth) ** (old / new)
    return out
