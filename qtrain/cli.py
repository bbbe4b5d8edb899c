"""The `qtrain` command (also `python -m qtrain`): Hydra entry point only.

Errors meant for the user (bad option values, missing data) print one paragraph and exit 2.
In a multirun (-m) a failing job is reported and the others still run; the command then exits 1
and lists the failed jobs.
"""

from __future__ import annotations

import logging
import os
import sys
import textwrap
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from qtrain.errors import EXIT_BAD_INPUT, EXIT_FAILED, Interrupted, QtrainError
from qtrain.keys import CONFIG_DIR
from qtrain.run import sweep_summary
from qtrain.run.lifecycle import quit_on_signals_outside_training, unique_dir

log = logging.getLogger("qtrain")
_failed_jobs: list[str] = []  # filled by failing multirun jobs, reported when the sweep ends
# run-directory names: w1a4, wfa2 (f = float)
OmegaConf.register_new_resolver("bits", lambda b: "f" if b is None else str(b), replace=True)


def _say(message: str) -> None:
    if _other_rank():  # torchrun: rank 0 says it
        return
    print("qtrain: error: " + textwrap.fill(message, width=100, subsequent_indent="  ", break_long_words=False,
                                                 break_on_hyphens=False), file=sys.stderr)


def _torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and "RANK" in os.environ


def _other_rank() -> bool:
    return _torchrun() and os.environ.get("RANK") != "0"


_agreed: dict[str, str] = {}


def _unique_dir(path: str) -> str:
    """Run and sweep folders are created exclusively: two runs started in the same second get two
    folders. Hydra resolves this before our task function runs, so a failure is reported here.
    Under torchrun, rank 0 creates the folder and every rank uses it."""
    try:
        if path not in _agreed:
            # torch, imported only when it is needed
            from qtrain.parallel.ranks import current_ranks

            _agreed[path] = current_ranks().decide(unique_dir, path)
        return _agreed[path]
    except QtrainError as e:
        _say(str(e))
        sys.exit(e.exit_code)


OmegaConf.register_new_resolver("unique_dir", _unique_dir, replace=True, use_cache=True)


def objective(result: dict | None, key: str) -> float:
    """What the task function returns to Hydra (Optuna and other sweepers): ``result[key]`` as a
    float, NaN for a failed or unfinished job (Optuna records such a trial as failed)."""
    value = (result or {}).get(key)
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> float:
    # imported here so that `qtrain --help` stays fast
    from qtrain.run.runner import main_run
    from qtrain.run.validate import check_added_keys

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    choices = OmegaConf.to_container(hc.runtime.choices)
    choices = {k: v for k, v in choices.items() if not k.startswith("hydra/")}
    result = None
    try:
        for line in check_added_keys(list(hc.overrides.task)):
            if not _other_rank():
                log.warning("%s", line)
        result = main_run(cfg, run_dir, choices)
    except Interrupted as e:  # a signal: one line, and a sweep stops here too
        args = [a for a in sys.argv[1:] if not a.startswith(("resume=", "-m", "--multirun"))]
        again = " ".join(sys.argv[1:]) if e.run_dir is None else f"{' '.join(args)} resume={e.run_dir}"
        if not _other_rank():
            print(f"qtrain: {e} Continue with: qtrain {again}".replace("  ", " "), file=sys.stderr)
        sys.exit(e.exit_code)
    except QtrainError as e:
        if hc.mode != RunMode.MULTIRUN:
            _say(str(e))
            sys.exit(e.exit_code)
        log.error("job %s failed: %s", hc.job.num, e)
        _failed_jobs.append(f"#{hc.job.num} {' '.join(hc.overrides.task)}: {e}")
    except Exception as e:
        if hc.mode != RunMode.MULTIRUN:
            raise
        log.error("job %s failed:\n%s", hc.job.num, traceback.format_exc())
        _failed_jobs.append(f"#{hc.job.num} {' '.join(hc.overrides.task)}: {type(e).__name__}: {e} (see {run_dir})")
    return objective(result, str(cfg.get("objective", "best_test_acc")))


def main() -> None:
    quit_on_signals_outside_training()
    if not (CONFIG_DIR / "config.yaml").exists():
        _say(f"the config folder {CONFIG_DIR} is missing. qtrain reads its configs from the repository's configs/ "
             "folder: install it from a checkout with `pip install -e .` (or `make install`).")
        sys.exit(EXIT_BAD_INPUT)
    if _torchrun():  # one process of several: join the group before Hydra makes the run folder
        # torch: `qtrain --help` stays fast without it
        from qtrain.parallel.launcher import join_torchrun

        try:
            join_torchrun(sys.argv)
        except QtrainError as e:
            _say(str(e))
            sys.exit(e.exit_code)
    finished = False
    try:
        _hydra_main()
        finished = not _failed_jobs
    finally:
        if _torchrun():
            from qtrain.parallel.ranks import leave

            leave(finished)
    if _failed_jobs:  # jobs that ran in this process: with their error messages
        print(f"qtrain: {len(_failed_jobs)} job(s) of the sweep failed:", file=sys.stderr)
        for line in _failed_jobs:
            print("  " + line, file=sys.stderr)
        sys.exit(EXIT_FAILED)
    if sweep_summary.FAILED:  # jobs that ran elsewhere (joblib, submitit): from the files they left
        print(f"qtrain: {len(sweep_summary.FAILED)} job(s) of the sweep did not complete (see their qtrain.log):",
              file=sys.stderr)
        for line in sweep_summary.FAILED:
            print("  " + line, file=sys.stderr)
        sys.exit(EXIT_FAILED)


if __name__ == "__main__":
    main()
