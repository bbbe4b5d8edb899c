"""What a run writes: TensorBoard scalars, metrics.jsonl, checkpoints and result.json.

Run directory:
    .hydra/                    composed config, overrides (written by Hydra); qtrain.log: the log
    tb/                        TensorBoard events, x axis epochs (train/loss, train/acc, test/loss, test/acc,
                               lr, ...; the HPARAMS tab; the config)
    tb/steps/                  TensorBoard events, x axis optimizer steps (train/loss_step, train/lr_step
                               every log_every_n_steps): a TensorBoard run of its own, see Recorder
    metrics.jsonl              one JSON object per epoch
    checkpoints/last.pt        everything needed to resume (written atomically every epoch, with a
                               checksum; see checkpoint.py); last.prev.pt: the one before it
    checkpoints/best.pt        the same, at the epoch with the best test accuracy (lowest loss
                               for regression)
    result.json                written once the run is complete
    fingerprint.txt            hash of the config (what resume=true matches on)
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import subprocess
from pathlib import Path

import numpy as np
import torch
import yaml

from qtrain.errors import DiskError
from qtrain.fileio import DISK_ERRNOS, disk_error, write_text_atomic
from qtrain.keys import REPO_ROOT
from qtrain.store import checkpoint

log = logging.getLogger("qtrain")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


#: what decides what a run computes; results, notes and scripts beside it may change while runs train
#: (a campaign snapshots its finished runs into results/) without making a run's code "dirty"
SOURCE_PATHS = ("qtrain", "configs", "pyproject.toml")


def code_identity(root: Path = REPO_ROOT) -> dict:
    """git SHA of the checkout at ``root``, and whether its source (SOURCE_PATHS) differs from it
    (None outside a git checkout)."""

    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)

    try:
        sha = git("rev-parse", "HEAD")
        if sha.returncode != 0:
            return {"git_sha": None, "git_dirty": None}
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", *SOURCE_PATHS).stdout.strip() != ""
        return {"git_sha": sha.stdout.strip(), "git_dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"git_sha": None, "git_dirty": None}


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class Recorder:
    """Writes one row per epoch to metrics.jsonl and TensorBoard, and the checkpoints.

    ``checkpoint_state()`` is called to build the checkpoint dict; ``best`` is tracked on
    ``test/acc`` (or ``test/loss`` when there is no accuracy) and kept in the checkpoint.
    ``start_epoch`` and ``start_step`` say where a resumed run's checkpoint was taken (completed
    epochs; optimizer steps, a stop inside an epoch included).

    A resumed run's TensorBoard writers drop the events a crashed process wrote past its last
    checkpoint (``purge_step``). TensorBoard then drops *every* tag's events from that step on, so the
    epoch axis and the optimizer-step axis live in two TensorBoard runs, tb/ and tb/steps/: in one,
    a resume after epoch 3 would also drop every per-step event from step 4 on, i.e. all of them.
    """

    def __init__(self, run_dir: Path, checkpoint_state, start_epoch: int = 0, best: dict | None = None,
                 start_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir = Path(run_dir)
        self.checkpoint_state = checkpoint_state
        self.best = best or {"epoch": None, "value": None, "key": None}
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.stopped_at = None  # where a signal stopped the run, for the message
        self.rows = self._load_rows(start_epoch)
        # purge_step drops events a crashed run wrote past its last checkpoint.
        self.tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=start_epoch + 1 if start_epoch else None)
        self._steps_purge = start_step + 1 if start_step else None
        self._steps_tb = None  # tb/steps/, made at the first per-step scalar (none when log_every_n_steps=0)

    def _load_rows(self, start_epoch: int) -> list[dict]:
        """Keep the rows of epochs already in the checkpoint; drop any written after it, and a torn
        last line (a full disk or a kill in the middle of a write)."""
        if not self.metrics_path.exists():
            return []
        rows = []
        for line in self.metrics_path.read_text(errors="replace").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                if line.strip():
                    log.warning("metrics.jsonl: dropping a torn row (%d characters) left by an interrupted write",
                                len(line))
        rows = [r for r in rows if isinstance(r, dict) and r.get("epoch", 1e9) <= start_epoch]
        write_text_atomic(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows))
        return rows

    def _append_row(self, row: dict) -> None:
        """Append one line; on a write error cut the file back to where it was (no torn row)."""
        line = (json.dumps(row) + "\n").encode()
        with open(self.metrics_path, "ab") as f:
            size = f.tell()
            try:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            except OSError as e:
                f.truncate(size)
                if e.errno in DISK_ERRNOS:
                    raise disk_error(e, self.metrics_path, len(line)) from None
                raise

    def _is_better(self, scalars: dict) -> bool:
        key, sign = ("test/acc", 1) if "test/acc" in scalars else ("test/loss", -1)
        value = scalars.get(key)
        if value is None:
            return False
        if self.best["value"] is None or sign * value > sign * self.best["value"]:
            self.best = {"epoch": None, "value": value, "key": key}
            return True
        return False

    def end_epoch(self, epoch: int, scalars: dict) -> None:
        """Log epoch ``epoch`` (1-based) and save its checkpoints.

        Order matters for a kill at any instant: the metrics row first (a row past the checkpoint
        is dropped on resume), then best.pt, then last.pt. last.pt is what a resume continues
        from, so best.pt is never behind the best epoch that last.pt records.
        """
        row = {"epoch": epoch, **{k: _jsonable(v) for k, v in scalars.items()}}
        self._append_row(row)
        self.rows.append(row)
        for k, v in scalars.items():
            if isinstance(v, (int, float)):
                self.tb.add_scalar(k, v, epoch)
        self.tb.flush()
        if self._steps_tb is not None:
            self._steps_tb.flush()
        best = dict(self.best)
        improved = self._is_better(scalars)
        if improved:
            self.best["epoch"] = epoch
        state = self.checkpoint_state(epoch, self.best)
        try:
            if improved:
                checkpoint.save(state, self.run_dir / "checkpoints" / "best.pt", keep_previous=False)
            checkpoint.save(state, self.run_dir / "checkpoints" / "last.pt")
        except DiskError:
            self.best = best
            raise
        log.info(self.epoch_line(row))

    def log_step(self, step: int, scalars: dict) -> None:
        """Scalars at a training step (x axis: optimizer steps), TensorBoard only, in tb/steps/."""
        if self._steps_tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self._steps_tb = SummaryWriter(str(self.run_dir / "tb" / "steps"), purge_step=self._steps_purge)
        for k, v in scalars.items():
            self._steps_tb.add_scalar(k, v, step)

    def log_config(self, config: dict, overrides: list[str]) -> None:
        self.tb.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "```")
        if overrides:
            self.tb.add_text("overrides", " ".join(f"`{o}`" for o in overrides))

    def log_hparams(self, hparams: dict, metrics: dict) -> None:
        """The HPARAMS tab: this run's settings beside its final numbers, so a sweep's runs compare."""
        clean = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()}
        self.tb.add_hparams(clean, {f"hparams/{k}": v for k, v in metrics.items() if v is not None}, run_name=".")

    def save_partial(self, epoch: int, totals: dict) -> None:
        """A checkpoint inside epoch ``epoch`` (0-based), after ``totals['batches']`` batches."""
        state = self.checkpoint_state(epoch, self.best)
        state["partial"] = totals
        checkpoint.save(state, self.run_dir / "checkpoints" / "last.pt")
        self.stopped_at = f"in epoch {epoch + 1} after batch {totals['batches']}"

    @staticmethod
    def epoch_line(row: dict) -> str:
        parts = [f"epoch {row['epoch']}"]
        for key, fmt in (("train/loss", "{:.4g}"), ("train/acc", "{:.2f}"), ("test/loss", "{:.4g}"),
                         ("test/acc", "{:.2f}"), ("test_relaxed/acc", "{:.2f}"), ("lr", "{:.3g}"),
                         ("train/images_per_s", "{:.0f}")):
            if row.get(key) is not None:
                parts.append(f"{key.replace('train/images_per_s', 'img/s')} {fmt.format(row[key])}")
        return " | ".join(parts)

    def write_result(self, result: dict) -> None:
        write_text_atomic(self.run_dir / "result.json", json.dumps(result, indent=2, default=str) + "\n")

    def close(self) -> None:
        self.tb.close()
        if self._steps_tb is not None:
            self._steps_tb.close()


class NullRecorder:
    """What ranks other than 0 of a data-parallel run record: nothing (rank 0 writes for all)."""

    rows: list = []
    best = {"epoch": None, "value": None, "key": None}
    stopped_at = None

    def end_epoch(self, epoch, scalars):
        pass

    def log_step(self, step, scalars):
        pass

    def save_partial(self, epoch, totals):
        pass

    def write_result(self, result):
        pass

    def close(self):
        pass
