"""How the processes of a data-parallel run start: ``qtrain devices=N`` from one command (workers
started by ``torch.distributed.elastic``, the engine behind torchrun, which brings the whole group
down with the first worker's error), or one process per rank started by torchrun itself.

The launcher is given the job it runs (:class:`Job`: what each worker does first, and the training
function); it imports nothing of qtrain above this package, so the layers only point down
(docs/ARCHITECTURE.md). What the loop needs from a data-parallel run is in :mod:`qtrain.parallel.ranks`.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
import signal
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from omegaconf import OmegaConf
from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, get_error_handler
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from qtrain.errors import EXIT_FAILED, QTRAIN_EXIT_CODES, SIGNAL_EXIT_CODES, ConfigError, Interrupted, QtrainError
from qtrain.parallel.ranks import LOG_FORMAT, join, leave, quiet_other_ranks

log = logging.getLogger("qtrain")
DEFAULT_TIMEOUT_S = 600


@dataclass(frozen=True)
class Job:
    """What each worker runs: ``on_start()`` first (e.g. its signal handling), then
    ``train(cfg, run_dir, resume_dir, choices) -> result``. Both must be module-level functions:
    the workers are spawned, so the job travels to them by name."""

    on_start: Callable[[], None]
    train: Callable[..., dict]


def join_torchrun(argv: list[str]) -> None:
    """qtrain started by torchrun (one process per rank, each running the whole command): join the
    group before Hydra makes the run folder, so that rank 0 makes it and the others use it (see
    cli.py's unique_dir resolver). Ranks other than 0 write no Hydra files and log only errors."""
    if any(a == "-m" or a.startswith("--multirun") for a in argv):
        raise ConfigError("a sweep (-m) cannot be started by torchrun: every rank would run every job. Run the sweep "
                          "without torchrun and give each job devices=N (qtrain -m ... devices=N).")
    timeout = next((a.split("=", 1)[1] for a in argv if a.startswith("collective_timeout_s=")), DEFAULT_TIMEOUT_S)
    ranks = join(float(timeout))
    quiet_other_ranks(ranks.rank)
    if not ranks.is_main:
        argv += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]


# ---------------------------------------------------------------------------------------------
# devices=N from one command: the launcher and its workers
# ---------------------------------------------------------------------------------------------


def resolve_devices(devices, device: str) -> int:
    """devices=auto: every visible GPU (1 on a machine without one, or with device=cpu)."""
    if devices == "auto":
        return torch.cuda.device_count() if device != "cpu" and torch.cuda.is_available() else 1
    if isinstance(devices, bool) or not isinstance(devices, int):
        raise ValueError(f"devices={devices!r}")
    return devices


def _log_file() -> str | None:
    """The file the Hydra job logs to (its qtrain.log): the workers' rank 0 appends to it."""
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.FileHandler):
            return h.baseFilename
    return None


def _setup_worker_logging(rank: int, log_file: str | None) -> None:
    if rank != 0:
        quiet_other_ranks(rank)
        return
    root = logging.getLogger()
    formatter = logging.Formatter(LOG_FORMAT)
    handlers = [logging.StreamHandler(sys.stdout)] + ([logging.FileHandler(log_file)] if log_file else [])
    for h in handlers:
        h.setFormatter(formatter)
        root.addHandler(h)
    root.setLevel(logging.INFO)


def _worker(job: Job, cfg_container: dict, run_dir: str, resume_dir: str | None, choices: dict,
            log_file: str | None, timeout_s: float):
    """One rank of ``qtrain devices=N`` (started by torch.distributed.elastic): the job's training, with
    the launcher's decision of what to resume."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    job.on_start()
    _setup_worker_logging(rank, log_file)
    if "OMP_NUM_THREADS" not in os.environ:  # the CPU's cores shared out between the ranks
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    finished = False
    try:
        join(timeout_s)
        cfg = OmegaConf.create(cfg_container)
        OmegaConf.set_struct(cfg, True)
        result = job.train(cfg, Path(run_dir), None if resume_dir is None else Path(resume_dir), choices)
        finished = True
        return result if rank == 0 else None
    except QtrainError as e:  # for the launcher: the message and the exit code, no traceback
        if rank == 0 and not isinstance(e, Interrupted):  # (a stop is logged where it happens)
            log.info("%s", e)
        get_error_handler().record_exception(e)
        sys.exit(e.exit_code)
    except Exception as e:
        get_error_handler().record_exception(e)  # for the launcher's report
        if _peer_failure(e):  # another rank died or stalled: its own error is the one to show
            log.error("rank %d: a collective failed: %s", rank, str(e).splitlines()[0])
        else:
            log.exception("rank %d failed", rank)  # the traceback, once, in the log (rank 0) or on stderr
        sys.exit(EXIT_FAILED)
    finally:
        leave(finished)


def launch(job: Job, cfg, run_dir: Path, resume_dir: Path | None, choices: dict, devices: int) -> dict:
    """Run ``job`` (continuing ``resume_dir`` when given) on ``devices`` workers started by
    torch.distributed.elastic (as torchrun would, on a free port of this node) and return rank 0's
    result. A worker that fails takes the others down; its message (and exit code: 2 bad input,
    3 diverged, 130/143 stopped by a signal) becomes ours."""
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=devices, run_id=f"qtrain-{uuid.uuid4().hex[:12]}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.2,
                          start_method="spawn", logs_specs=DefaultLogsSpecs(),
                          signals_to_handle="SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1")
    for name in ("torch.distributed.elastic", "torch.multiprocessing"):  # the workers report their own errors
        logging.getLogger(name).setLevel(logging.CRITICAL)
    timeout = float(cfg.get("collective_timeout_s", DEFAULT_TIMEOUT_S))
    args = (job, OmegaConf.to_container(cfg, resolve=True), str(run_dir), None if resume_dir is None else str(resume_dir),
            choices, _log_file(), timeout)
    log.info("devices=%d: starting %d workers (torch.distributed, %s)", devices, devices,
             "NCCL" if torch.cuda.is_available() and cfg.device != "cpu" else "Gloo")
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    method = multiprocessing.get_start_method(allow_none=True)
    if method not in (None, "spawn", "fork", "forkserver"):  # joblib's "loky": a spawned worker could not set it
        multiprocessing.set_start_method("spawn", force=True)
    try:
        return elastic_launch(config, _worker)(*args)[0]
    except SignalException as e:  # the workers got the signal too, and saved a checkpoint
        raise Interrupted(f"stopped by {e.sigval.name}; the workers saved a checkpoint in {run_dir}.",
                          SIGNAL_EXIT_CODES.get(e.sigval.name, 128 + e.sigval.value), run_dir) from None
    except ChildFailedError as e:
        raise _failure(e, devices, run_dir, timeout) from None
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
        if method != multiprocessing.get_start_method(allow_none=True):
            multiprocessing.set_start_method(method, force=True)


PEER_FAILURES = ("Timed out", "Connection closed by peer", "Connection reset by peer", "Broken pipe")


def _peer_failure(e: BaseException) -> bool:
    return isinstance(e, RuntimeError) and any(m in str(e) for m in PEER_FAILURES)


def _failure(error, devices: int, run_dir: Path, timeout: float) -> QtrainError:
    """The error of a failed group: rank 0's own message when it ended with one of qtrain's exit
    codes, else the first worker that failed."""
    failures = error.failures
    rank, failure = (0, failures[0]) if 0 in failures and failures[0].exitcode in QTRAIN_EXIT_CODES \
        else error.get_first_failure()
    message = failure.message
    if isinstance(message, dict):  # an exception the worker recorded: its "Type: text" (the traceback is above)
        message = message.get("message", str(message))
    code = failure.exitcode
    if code in QTRAIN_EXIT_CODES:
        text = re.sub(r"^\w+: ", "", message)  # "ConfigError: ..." -> "..."
        if code in SIGNAL_EXIT_CODES.values():
            return Interrupted(text, code, run_dir)
        err = QtrainError(text)
        err.exit_code = code
        return err
    if "Timed out" in message:
        message += f" (a worker stopped answering for collective_timeout_s={timeout:g} s)"
    what = f"signal {-code}" if code < 0 else f"exit code {code}"
    err = QtrainError(f"worker {rank} of {devices} failed ({what}): {message}. The other workers were stopped; "
                      f"the run folder is {run_dir} (resume=true continues from its last checkpoint).")
    err.exit_code = EXIT_FAILED  # a crash, not bad input
    return err
