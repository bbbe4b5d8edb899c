"""The one training loop. It never reads the config: run.py builds the objects and calls fit().

Every method (float / ste / binaryrelax / bcgd) plugs in through the same five calls; see
methods.py for what each does at those points.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time

import torch
import torch.nn.functional as F

log = logging.getLogger("qtrain")


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


def _autocast(device: torch.device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _totals(loss_sum, correct_sum, n):
    return {"loss": float(loss_sum) / n, "acc": None if correct_sum is None else 100.0 * float(correct_sum) / n}


def train_one_epoch(model, method, optimizer, loader, task, device, amp_dtype=None, bar=None) -> dict:
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct_sum = torch.zeros((), device=device, dtype=torch.long)
    n, start = 0, time.perf_counter()
    for i, (x, y) in enumerate(loader):
        method.prepare_forward()
        with _autocast(device, amp_dtype):
            out = model(x)
            loss = task.loss(out, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        method.before_step()
        optimizer.step()
        method.after_step()

        loss_sum += loss.detach() * len(y)
        correct = task.correct(out.detach(), y)
        if correct is None:
            correct_sum = None
        else:
            correct_sum += correct
        n += len(y)
        if bar is not None and (i % 20 == 0 or i == len(loader) - 1):  # a host sync, so not every batch
            stats = _totals(loss_sum, correct_sum, n)
            bar.set_postfix(loss=f"{stats['loss']:.4f}", acc=stats["acc"] and f"{stats['acc']:.2f}",
                            img_s=f"{n / (time.perf_counter() - start):.0f}", refresh=False)
            bar.update(i + 1 - bar.n)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return {**_totals(loss_sum, correct_sum, n), "images_per_s": n / seconds, "seconds": seconds}


@torch.no_grad()
def evaluate(model, loader, task, device, amp_dtype=None) -> dict:
    model.eval()
    loss_sum = torch.zeros((), device=device)
    correct_sum = torch.zeros((), device=device, dtype=torch.long)
    n = 0
    for x, y in loader:
        with _autocast(device, amp_dtype):
            out = model(x)
            loss_sum += task.loss(out, y).float() * len(y)
        correct = task.correct(out, y)
        correct_sum = None if correct is None else correct_sum + correct
        n += len(y)
    return _totals(loss_sum, correct_sum, n)


def _progress_bar(enabled: bool, epoch: int, epochs: int, total: int):
    if not (enabled and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=f"epoch {epoch + 1}/{epochs}", leave=False, dynamic_ncols=True)


def fit(model, method, optimizer, scheduler, data, task, recorder, *, epochs, start_epoch=0, device,
        amp_dtype=None, stop_after_epoch=None, progress=True) -> bool:
    """Train from ``start_epoch`` to ``epochs``; returns True when all epochs are done.

    ``stop_after_epoch`` ends the run early (as an interruption would), leaving a resumable
    checkpoint behind.
    """
    for epoch in range(start_epoch, epochs):
        data.train.set_epoch(epoch)
        method.on_epoch_start(epoch)
        lr = optimizer.param_groups[0]["lr"]
        bar = _progress_bar(progress, epoch, epochs, len(data.train))
        try:
            train = train_one_epoch(model, method, optimizer, data.train, task, device, amp_dtype, bar)
        finally:
            if bar is not None:
                bar.close()
        scheduler.step()
        scalars = {"train/loss": train["loss"], "train/acc": train["acc"], "lr": lr,
                   "train/images_per_s": train["images_per_s"], "train/epoch_seconds": train["seconds"]}
        for prefix, context in method.evaluations():
            with context:
                result = evaluate(model, data.test, task, device, amp_dtype)
            scalars[f"{prefix}/loss"], scalars[f"{prefix}/acc"] = result["loss"], result["acc"]
        scalars.update(method.on_epoch_end(epoch))
        recorder.end_epoch(epoch + 1, {k: v for k, v in scalars.items() if v is not None})
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch and epoch + 1 < epochs:
            log.info("stopping after epoch %d as asked (stop_after_epoch); resume with resume=true", epoch + 1)
            return False
    return True
