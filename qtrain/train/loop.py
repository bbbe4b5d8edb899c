"""The one training loop. It never reads the config: qtrain/run/build.py builds the objects and
qtrain/run/runner.py calls fit().

Every method (float / ste / binaryrelax / bcgd) plugs in through the same five calls; see
methods.py for what each does at those points. In a data-parallel run (qtrain/parallel/) the model
is wrapped in DistributedDataParallel and the loaders yield this rank's share; ``ranks`` does the
few reductions the loop needs (sums, the stop signal, the divergence step) and is a no-op for one
process.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from qtrain.methods import Method
from qtrain.parallel.ranks import SINGLE, Ranks
from qtrain.train.tasks import Classification, Regression

log = logging.getLogger("qtrain")


def amp_context(device: torch.device, dtype):
    """torch.autocast for ``dtype`` (bf16 runs), or nothing when dtype is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _totals(loss_sum, correct_sum, n):
    return {"loss": float(loss_sum) / n, "acc": None if correct_sum is None else 100.0 * float(correct_sum) / n}


class EpochTotals:
    """Running sums of one training epoch, kept on the device (no host sync per batch).

    ``state()`` goes into a mid-epoch checkpoint and ``EpochTotals(device, **state)`` restores it, so a
    run resumed there reports the same epoch loss and accuracy as an uninterrupted one, and an epoch time
    (``seconds``: the training time of every process that worked on the epoch) that is the whole epoch's. ``summary()``
    and ``state()`` are of all ranks (collectives: every rank calls them); ``local_summary()`` is this
    rank's, for its progress bar.
    """

    def __init__(self, device, loss_sum=0.0, correct_sum=0, n=0, batches=0, seconds=0.0, ranks=SINGLE):
        self.loss_sum = torch.tensor(float(loss_sum), device=device)
        self.correct_sum = None if correct_sum is None else torch.tensor(int(correct_sum), device=device)
        self.n, self.batches, self.seconds, self.ranks = n, batches, seconds, ranks

    def add(self, loss, correct, n):
        self.loss_sum += loss * n
        self.correct_sum = None if correct is None or self.correct_sum is None else self.correct_sum + correct
        self.n += n
        self.batches += 1

    def local_summary(self):
        return _totals(self.loss_sum, self.correct_sum, max(self.n, 1))

    def summary(self):
        loss_sum, correct_sum, n = self.ranks.sum(self.loss_sum, self.correct_sum, self.n)
        return _totals(loss_sum, correct_sum, max(n, 1))

    def state(self):
        """The sums of all ranks, and (several ranks) each rank's own, to continue from exactly
        (Ranks.partial_totals)."""
        per_rank = self.ranks.gather(
            [float(self.loss_sum), None if self.correct_sum is None else int(self.correct_sum), self.n])
        correct = None if self.correct_sum is None else sum(c for _, c, _ in per_rank)
        state = {"loss_sum": sum(loss for loss, _, _ in per_rank), "n": sum(n for _, _, n in per_rank),
                 "batches": self.batches, "correct_sum": correct, "seconds": self.seconds}
        if self.ranks.world > 1:
            state["per_rank"] = per_rank
        return state


class DivergenceWatch:
    """Stops a run at the first non-finite loss or weight, at the cost of one host sync every
    ``every`` steps: the first bad step is recorded on the device as it happens."""

    def __init__(self, named_params, device, every=50, ranks=SINGLE):
        self.named = [(n, p) for n, p in named_params]
        self.every, self.device, self.ranks = every, device, ranks
        self.first_bad = torch.full((), -1, device=device, dtype=torch.long)

    def after_step(self, step, loss):
        bad = ~torch.isfinite(loss.detach())
        self.first_bad = torch.where(bad & (self.first_bad < 0), step, self.first_bad)
        if (step + 1) % self.every == 0:
            self.check(step)

    def check(self, step):
        """Raise :class:`NonFinite` (fit adds the epoch) if the loss or any weight is non-finite."""
        first = self.ranks.earliest(int(self.first_bad))  # a loss is a rank's own; the weights are shared
        if first >= 0:
            raise NonFinite(first + 1, "the training loss", exact=True)
        finite = torch.stack([torch.isfinite(p).all() for _, p in self.named])
        if not bool(finite.all()):
            bad = [n for (n, _), ok in zip(self.named, finite.tolist()) if not ok]
            raise NonFinite(step + 1, f"the weights of {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}")


class NonFinite(Exception):
    def __init__(self, step, what, exact=False):
        super().__init__(f"{what} became non-finite {'at' if exact else 'by'} step {step}")
        self.step, self.what, self.exact = step, what, exact


@dataclass
class Training:
    """The objects the loop works with (qtrain/run/build.py makes them from the config).

    ``model`` is what is stepped (DistributedDataParallel around the model in a data-parallel run) and
    ``eval_model`` what is evaluated (default: ``model``). ``scheduler`` is stepped after every
    optimizer step when ``sched_interval`` is "step", after every epoch otherwise."""

    model: nn.Module
    method: Method
    optimizer: torch.optim.Optimizer
    task: Classification | Regression
    device: torch.device
    scheduler: object = None
    amp_dtype: torch.dtype | None = None
    sched_interval: str = "epoch"
    ranks: Ranks = SINGLE
    eval_model: nn.Module | None = None


@dataclass
class Plan:
    """How far the loop goes: epochs ``start_epoch`` (inside it from ``partial``, a mid-epoch
    checkpoint's sums) to ``epochs``, or until ``stop_after_epoch``. ``log_every``: train/loss_step and
    train/lr_step every N optimizer steps of the run (0: off)."""

    epochs: int
    start_epoch: int = 0
    partial: dict | None = None
    stop_after_epoch: int | None = None
    progress: bool = True
    log_every: int = 0


@dataclass
class StepLog:
    """Call ``fn(step, loss)`` at every ``every``-th optimizer step of the run; the steps before this
    epoch's first batch are ``first_step`` (a host sync at each logged step only)."""

    every: int
    first_step: int
    fn: Callable[[int, torch.Tensor], None]

    def after(self, batches: int, loss: torch.Tensor) -> None:
        step = self.first_step + batches
        if step % self.every == 0:
            self.fn(step, loss.detach())


def train_one_epoch(t: Training, loader, *, bar=None, totals=None, watch=None, stop=None,
                    step_log: StepLog | None = None) -> dict:
    """One pass over ``loader`` (from wherever it was set to start). ``totals`` carries a resumed
    epoch's sums; ``stop.requested`` (a signal) ends the epoch after the current step, and the
    result then says ``partial``."""
    t.model.train()
    totals = totals or EpochTotals(t.device, ranks=t.ranks)
    start, first = time.perf_counter(), totals.n
    last_draw = start
    step_scheduler = t.scheduler if t.sched_interval == "step" else None
    for x, y in loader:
        t.method.prepare_forward()
        with amp_context(t.device, t.amp_dtype):
            out = t.model(x)
            loss = t.task.loss(out, y)
        t.optimizer.zero_grad(set_to_none=True)
        # 1, except for a data-parallel run's uneven last batch (data.loss_weight)
        weight = loader.loss_weight(totals.batches) if hasattr(loader, "loss_weight") else 1
        (loss if weight == 1 else loss * weight).backward()
        t.method.before_step()
        t.optimizer.step()
        t.method.after_step()
        if step_scheduler is not None:
            step_scheduler.step()

        totals.add(loss.detach(), t.task.correct(out.detach(), y), len(y))
        if watch is not None:
            watch.after_step(totals.batches - 1, loss)
        if step_log is not None:
            step_log.after(totals.batches, loss)
        if bar is not None and (time.perf_counter() - last_draw > 1.0 or totals.batches == len(loader)):
            last_draw = time.perf_counter()  # redraw about once a second: each redraw is a host sync
            _show(bar, totals, (totals.n - first) / (last_draw - start))
        if t.ranks.stop_signal(stop):
            break
    if watch is not None:
        watch.check(totals.batches - 1)
    if t.device.type == "cuda":
        torch.cuda.synchronize(t.device)
    seconds = time.perf_counter() - start
    totals.seconds += seconds  # the epoch's time so far, of this process and any before it (a resumed epoch)
    partial = totals.batches < len(loader)
    (images,) = t.ranks.sum(totals.n - first)  # of all ranks: the run's throughput
    # images/s is of this process's part of the epoch: a rate, so a resumed epoch's is still a fair one
    return {**totals.summary(), "images_per_s": images / max(seconds, 1e-9), "seconds": totals.seconds,
            "partial": partial, "totals": totals}


def _show(bar, totals: EpochTotals, images_per_s: float) -> None:
    stats = totals.local_summary()
    post = {"loss": f"{stats['loss']:.4f}"}
    if stats["acc"] is not None:
        post["acc"] = f"{stats['acc']:.2f}"
    post["img/s"] = f"{images_per_s:.0f}"
    bar.set_postfix(post, refresh=False)
    bar.update(totals.batches - bar.n)


@torch.no_grad()
def evaluate(model, loader, task, device, amp_dtype=None, bar=None, ranks=SINGLE) -> dict:
    """Test loss and accuracy of ``model`` over ``loader`` (this rank's batches; summed over the
    ranks). The loss is summed in float64: per-batch losses times batch sizes then add up exactly,
    in any order, so a sharded evaluation gives the single-process numbers."""
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct_sum = torch.zeros((), device=device, dtype=torch.long)
    n = 0
    for x, y in loader:
        with amp_context(device, amp_dtype):
            out = model(x)
            loss_sum += task.loss(out, y).double() * len(y)
        correct = task.correct(out, y)
        correct_sum = None if correct is None else correct_sum + correct
        n += len(y)
        if bar is not None:
            bar.update(1)  # no host sync: the count is known on the host
    return _totals(*ranks.sum(loss_sum, correct_sum, n))


def _progress_bar(enabled: bool, epoch: int, epochs: int, total: int, done: int = 0, what: str = "train"):
    """A terminal progress bar (none when not a terminal): redrawn about once a second, sized to the
    terminal; the training bar shows loss, acc, img/s in that order."""
    if not (enabled and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=done, desc=f"ep {epoch + 1}/{epochs} {what}", leave=False, dynamic_ncols=True,
                mininterval=1.0, bar_format="{desc} |{bar:8}| {n_fmt}/{total_fmt} "
                "{elapsed}<{remaining}{postfix}")


def fit(t: Training, data, recorder, plan: Plan, *, stop=None, watch=None) -> str:
    """Train ``plan.start_epoch`` to ``plan.epochs``. Returns "complete", "stopped" (``stop_after_epoch``:
    a budgeted run, resumable) or "interrupted" (``stop.requested``: a signal; a checkpoint at
    the current step was saved). A non-finite loss or weight raises :class:`NonFinite` (nothing is
    saved for that epoch)."""
    partial = plan.partial
    for epoch in range(plan.start_epoch, plan.epochs):
        first_batch = partial["batches"] if partial else 0
        data.train.set_epoch(epoch, first_batch)
        t.method.on_epoch_start(epoch)
        lr = t.optimizer.param_groups[0]["lr"]
        totals = EpochTotals(t.device, **t.ranks.partial_totals(partial), ranks=t.ranks) if partial else None
        partial = None
        step_log = None
        if plan.log_every:  # every N optimizer steps of the run (a resumed one continues the count)
            step_log = StepLog(plan.log_every, epoch * len(data.train), lambda step, loss: recorder.log_step(
                step, {"train/loss_step": float(loss), "train/lr_step": t.optimizer.param_groups[0]["lr"]}))
        bar = _progress_bar(plan.progress, epoch, plan.epochs, len(data.train), first_batch)
        try:
            train = train_one_epoch(t, data.train, bar=bar, totals=totals, watch=watch, stop=stop, step_log=step_log)
        except NonFinite as e:
            e.epoch = epoch + 1
            raise
        finally:
            if bar is not None:
                bar.close()
        if train["partial"]:
            recorder.save_partial(epoch, train["totals"].state())
            return "interrupted"
        if t.sched_interval == "epoch":
            t.scheduler.step()
        scalars = {"train/loss": train["loss"], "train/acc": train["acc"], "lr": lr,
                   "train/images_per_s": train["images_per_s"], "train/epoch_seconds": train["seconds"]}
        scalars.update(evaluate_epoch(t, data.test, plan, epoch))
        scalars.update(t.method.on_epoch_end(epoch))
        recorder.end_epoch(epoch + 1, {k: v for k, v in scalars.items() if v is not None})
        if t.ranks.stop_signal(stop):
            return "interrupted"
        if plan.stop_after_epoch is not None and plan.stop_after_epoch <= epoch + 1 < plan.epochs:
            log.info("stopping after epoch %d as asked (stop_after_epoch); resume with resume=true", epoch + 1)
            return "stopped"
    return "complete"


def evaluate_epoch(t: Training, loader, plan: Plan, epoch: int) -> dict:
    """The epoch's test numbers, in every context of the method's ``evaluations()``."""
    eval_model = t.model if t.eval_model is None else t.eval_model
    t.ranks.sync_buffers(eval_model)  # every rank evaluates rank 0's model, the one checkpointed
    scalars = {}
    for prefix, context in t.method.evaluations():
        bar = _progress_bar(plan.progress, epoch, plan.epochs, len(loader), what=prefix)
        try:
            with context:
                result = evaluate(eval_model, loader, t.task, t.device, t.amp_dtype, bar, t.ranks)
        finally:
            if bar is not None:
                bar.close()
        scalars[f"{prefix}/loss"], scalars[f"{prefix}/acc"] = result["loss"], result["acc"]
    return scalars
