"""What a run writes: TensorBoard scalars, metrics.jsonl, checkpoints and result.json.

Run directory:
    .hydra/                    composed config, overrides (written by Hydra); qtrain.log: the log
    tb/                        TensorBoard events (train/loss, train/acc, test/loss, test/acc, lr, ...)
    metrics.jsonl              one JSON object per epoch
    checkpoints/last.pt        everything needed to resume (written atomically every epoch)
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

log = logging.getLogger("qtrain")


def atomic_torch_save(obj, path: Path) -> None:
    """Write to a temporary file in the same folder, then rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


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


def code_identity() -> dict:
    """git SHA and dirty flag of the qtrain source tree (None outside a git checkout)."""
    root = Path(__file__).resolve().parent.parent

    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)

    try:
        sha = git("rev-parse", "HEAD")
        if sha.returncode != 0:
            return {"git_sha": None, "git_dirty": None}
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip() != ""
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
    """

    def __init__(self, run_dir: Path, checkpoint_state, start_epoch: int = 0, best: dict | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir = Path(run_dir)
        self.checkpoint_state = checkpoint_state
        self.best = best or {"epoch": None, "value": None, "key": None}
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.rows = self._load_rows(start_epoch)
        # purge_step drops events a crashed run wrote past its last checkpoint.
        self.tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=start_epoch + 1 if start_epoch else None)

    def _load_rows(self, start_epoch: int) -> list[dict]:
        """Keep the rows of epochs already in the checkpoint; drop any written after it."""
        if not self.metrics_path.exists():
            return []
        rows = [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if r["epoch"] <= start_epoch]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows))
        return rows

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
        row = {"epoch": epoch, **{k: _jsonable(v) for k, v in scalars.items()}}
        self.rows.append(row)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for k, v in scalars.items():
            if isinstance(v, (int, float)):
                self.tb.add_scalar(k, v, epoch)
        self.tb.flush()
        improved = self._is_better(scalars)
        if improved:
            self.best["epoch"] = epoch
        state = self.checkpoint_state(epoch, self.best)
        atomic_torch_save(state, self.run_dir / "checkpoints" / "last.pt")
        if improved:
            atomic_torch_save(state, self.run_dir / "checkpoints" / "best.pt")
        log.info(self.epoch_line(row))

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
        atomic_write_text(self.run_dir / "result.json", json.dumps(result, indent=2, default=str) + "\n")

    def close(self) -> None:
        self.tb.close()
