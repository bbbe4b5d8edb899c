"""A table at the end of every multirun: each job's overrides, status, final/best accuracy and wall time.

A Hydra callback (``hydra.callbacks.sweep_summary`` in configs/config.yaml), so it runs with any
launcher or sweeper (basic, joblib, submitit, Optuna). It reads what the jobs wrote (result.json,
.hydra/overrides.yaml) rather than their return values, so jobs that failed or were cut off are
listed too. Written as ``summary.csv`` and ``summary.md`` in the sweep folder, and printed.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("qtrain")

COLUMNS = ["job", "overrides", "status", "final_test_acc", "best_test_acc", "best_epoch", "final_train_loss",
           "wall_time_s", "run_dir"]


def _job_row(job_dir: Path) -> dict:
    overrides = job_dir / ".hydra" / "overrides.yaml"
    row = {"job": job_dir.name, "run_dir": str(job_dir),
           "overrides": " ".join(yaml.safe_load(overrides.read_text()) or []) if overrides.exists() else ""}
    result = job_dir / "result.json"
    if result.exists():
        r = json.loads(result.read_text())
        row.update({k: r.get(k) for k in COLUMNS if k in r and k not in ("run_dir",)})
        row["status"] = r.get("status", "?")
        if (job_dir / "resumed_into.txt").exists() or r.get("run_dir") != str(job_dir):
            row["run_dir"] = r.get("run_dir", str(job_dir))  # resume=true continued an earlier folder
    elif (job_dir / "resumed_into.txt").exists():
        target = Path((job_dir / "resumed_into.txt").read_text().strip())
        inner = _job_row(target) if (target / "result.json").exists() else {"status": "incomplete"}
        row.update({k: v for k, v in inner.items() if k not in ("job", "overrides")})
    else:
        row["status"] = "failed or incomplete (see its qtrain.log)"
    return row


def sweep_rows(sweep_dir: Path) -> list[dict]:
    jobs = [d for d in Path(sweep_dir).iterdir() if d.is_dir() and (d / ".hydra").is_dir()]
    return [_job_row(d) for d in sorted(jobs, key=lambda d: (len(d.name.split("_")[0]), d.name))]


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 0.1 or abs(v) >= 1e4 else f"{v:.2f}"
    return "" if v is None else str(v)


def write_summary(sweep_dir: Path) -> str:
    rows = sweep_rows(sweep_dir)
    with open(Path(sweep_dir) / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    shown = [c for c in COLUMNS if c != "run_dir"]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in shown) + " |" for r in rows]
    text = "\n".join(lines) + "\n"
    (Path(sweep_dir) / "summary.md").write_text(text)
    return text


#: jobs of the last multirun that did not complete; cli.main exits 1 when there are any. Read from
#: the files the jobs left, so it also works when the jobs ran in other processes (joblib, submitit).
FAILED: list[str] = []


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            return
        text = write_summary(sweep_dir)
        print(f"\nqtrain: sweep summary ({sweep_dir}/summary.md, summary.csv)\n{text}")
        FAILED[:] = [f"{r['job']} ({r['status']}): {r['overrides']}" for r in sweep_rows(sweep_dir)
                     if r.get("status") not in ("complete", "stopped")]
