"""Where the float model of ``init=float`` is kept, and when it is trained: once per seed and recipe,
under ``<out_dir>/float/<data>_<model>_s<seed>_<fingerprint>/``, shared by every cell that starts
from it (two jobs wanting it at once: one trains, the other waits). A damaged cached model is
recomputed, from its previous checkpoint when that is intact. What the float model *is* (its
config) is float_start.py's.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import shutil
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig

from qtrain.errors import Interrupted
from qtrain.keys import short_name
from qtrain.parallel.ranks import current_ranks
from qtrain.run.float_start import float_config
from qtrain.run.resume import FINGERPRINT_FILE, fingerprint
from qtrain.store import checkpoint

log = logging.getLogger("qtrain")


def float_run_dir(cfg: DictConfig, key: str) -> Path:
    """Where init=float caches the float model of ``cfg`` (``key``: the fingerprint of its float_config),
    named by the float model's own seed (``pretrain.seed`` may keep it apart from the run's)."""
    return Path(cfg.out_dir).resolve() / "float" / f"{short_name(cfg.data)}_" \
        f"{short_name(cfg.model).lower()}_s{float_config(cfg).seed}_{key}"


def float_checkpoint(cfg: DictConfig, train: Callable[..., dict]) -> Path:
    """Path of the cached float checkpoint for ``cfg``; trains it first when missing, with ``train``
    (runner.train_run, given: this module is below the runner)."""
    ranks = current_ranks()
    fcfg = float_config(cfg)
    run_dir = float_run_dir(cfg, ranks.decide(fingerprint, fcfg))
    ckpt = run_dir / "checkpoints" / "last.pt"
    if ranks.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    # two jobs wanting the same float model: one trains it, the other waits (train_run's own
    # RunLock on .lock is non-blocking, hence a second lock file here)
    with ranks.main_only(waiting_lock(run_dir / ".cache.lock")):
        needed, resume = ranks.decide(_float_plan, run_dir, ckpt)
        if needed:
            try:
                train(fcfg, run_dir, resume_dir=resume)
            except Interrupted as e:  # the float model continues where it stopped when this command runs again
                raise Interrupted(f"{e} (the float model that init=float trains first; running the same command "
                                  "again continues it where it stopped)", e.exit_code, None) from None
    return ckpt


def float_start_record(ckpt: Path) -> dict:
    """result.json's ``float_start`` of a run that started from the cached float model ``ckpt``: which
    float run, at what schedule, and how good it was (qtrain-report shows it beside the cell)."""
    run_dir = Path(ckpt).parent.parent
    r = json.loads((run_dir / "result.json").read_text())
    return {"run_dir": str(run_dir), "fingerprint": (run_dir / FINGERPRINT_FILE).read_text().strip(),
            "epochs": r.get("epochs"), "schedule_scale": r.get("schedule_scale", 1),
            "unscaled_epochs": r.get("unscaled_epochs"), "final_test_acc": r.get("final_test_acc"),
            "best_test_acc": r.get("best_test_acc"), "best_epoch": r.get("best_epoch")}


@contextlib.contextmanager
def waiting_lock(path: Path):
    """An exclusive flock that waits for its holder (the float-model cache)."""
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _float_plan(run_dir: Path, ckpt: Path) -> tuple[bool, Path | None]:
    """(train?, the run folder to resume) for the cached float model; a damaged cached model is
    recomputed, from its previous checkpoint when that is intact."""
    if (run_dir / "result.json").exists():
        state, why = checkpoint.problem(ckpt)
        if state is None:  # retrain from the previous checkpoint (or from scratch): the same weights again
            usable = checkpoint.problem(checkpoint.previous_path(ckpt))[0] is not None
            log.warning("init=float: the cached float model %s is %s; recomputing it from %s", ckpt, why,
                        "its previous checkpoint" if usable else "the start")
            (run_dir / "result.json").unlink()
            if not usable:
                shutil.rmtree(run_dir / "checkpoints")
                (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    if (run_dir / "result.json").exists():
        log.info("init=float: reusing the float model in %s", run_dir)
        return False, None
    log.info("init=float: training the float model first, in %s", run_dir)
    return True, run_dir if checkpoint.has_checkpoint(ckpt) else None
