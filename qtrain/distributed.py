"""Data-parallel runs: which process is which, who writes, and how the workers start.

A data-parallel run is N processes ("ranks") that train one model, each on its shard of every
batch, into one run folder. PyTorch does the work: ``torch.distributed`` for the process group
(Gloo on the CPU, NCCL for CUDA tensors), ``DistributedDataParallel`` for the gradient all-reduce,
and ``torch.distributed.elastic`` -- the engine behind torchrun -- to start the workers of
``qtrain devices=N`` and to bring the whole group down with the first worker's error when one dies.

The rules every rank follows:

- every rank runs the same code; **rank 0 alone touches the file system** (locks, the run folder,
  the log, TensorBoard, metrics.jsonl, checkpoints, result.json) and makes every decision that is
  read from it (which run to resume, whether the float model must be trained first); the other
  ranks receive its answer (:meth:`Ranks.decide`);
- ``data.batch_size`` is the global batch: each rank takes its slice of every batch of the same
  (seed, epoch) order, so the recipe does not change with the number of devices;
- sums (an epoch's loss and accuracy counts, the test results) are all-reduced, so what is logged is
  that of the whole batch and of the whole test set;
- a signal received by any rank stops all of them after the same step (agreed after every step).

:data:`SINGLE` (one process) turns every collective into nothing: ``devices=1`` runs the code it
always ran. :func:`current` is this process's :class:`Ranks`, like torch.distributed's own group.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import multiprocessing
import os
import re
import signal
import sys
import uuid
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from qtrain.errors import ConfigError, QtrainError

log = logging.getLogger("qtrain")
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # Hydra's default job log format
DEFAULT_TIMEOUT_S = 600
#: a repeat of a signal within this many seconds is the same request: on Ctrl-C the terminal signals
#: every worker and the launcher then forwards the signal to them once more
REPEAT_WINDOW_S = 3.0


class Ranks:
    """This process's place in a data-parallel run, and the few collectives the run needs."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0):
        self.rank, self.world, self.local_rank = rank, world, local_rank

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- decisions and side effects ---------------------------------------------------------------
    def decide(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` evaluated on rank 0 and its value returned on every rank; a
        QtrainError it raises is raised on every rank."""
        if self.world == 1:
            return fn(*args, **kwargs)
        box = [None]
        if self.is_main:
            try:
                box = [("value", fn(*args, **kwargs))]
            except QtrainError as e:
                box = [("error", (type(e), str(e)))]
        dist.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "error":
            cls, message = value
            raise cls(message)
        return value

    def main_only(self, context):
        """``context`` (a lock, a file) on rank 0; nothing on the others."""
        return context if self.is_main else contextlib.nullcontext()

    # -- reductions ---------------------------------------------------------------------------------
    def sum(self, *values):
        """Each value (a number or a 0-d tensor; None passes through) summed over the ranks, in
        float64, as Python floats. With one process the values come back as they are."""
        if self.world == 1:
            return values
        present = [i for i, v in enumerate(values) if v is not None]
        t = torch.tensor([float(values[i]) for i in present], dtype=torch.float64)
        dist.all_reduce(t)
        out = list(values)
        for i, v in zip(present, t.tolist()):
            out[i] = v
        return tuple(out)

    def earliest(self, step: int) -> int:
        """The smallest non-negative ``step`` over the ranks (-1: none)."""
        if self.world == 1:
            return step
        t = torch.tensor([step if step >= 0 else 2**62], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return -1 if int(t) == 2**62 else int(t)

    def stop_signal(self, stop) -> str | None:
        """The signal any rank has received (None: none), the same on every rank; called after every
        step, so all ranks stop after the same one."""
        if stop is None:
            return None
        if self.world == 1:
            return stop.requested
        t = torch.tensor([signal.Signals[stop.requested].value if stop.requested else 0], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if int(t) and stop.requested is None:
            stop.requested = signal.Signals(int(t)).name
        return stop.requested

    def sync_buffers(self, module: torch.nn.Module) -> None:
        """Rank 0's buffers (batch-norm running statistics) on every rank: evaluation, sharded over the
        ranks, is then that of rank 0's model -- the one its checkpoint holds."""
        if self.world == 1:
            return
        for b in module.buffers():
            dist.broadcast(b, src=0)

    def gather(self, value) -> list:
        """``value`` of every rank, in rank order (any picklable value)."""
        if self.world == 1:
            return [value]
        out = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def partial_totals(self, partial: dict | None) -> dict | None:
        """The epoch sums a rank continues from after a mid-epoch stop: its own, as they were (each rank
        keeps accumulating its float32 sums exactly as it would have). A checkpoint without them (one
        process) gives rank 0 the whole sums and the others zero."""
        if partial is None:
            return None
        own = {k: v for k, v in partial.items() if k != "per_rank"}
        if "per_rank" in partial and len(partial["per_rank"]) == self.world:
            own["loss_sum"], own["correct_sum"], own["n"] = partial["per_rank"][self.rank]
        elif not self.is_main:
            own.update(loss_sum=0.0, n=0, correct_sum=None if partial["correct_sum"] is None else 0)
        return own

    # -- objects ------------------------------------------------------------------------------------
    def shard(self, data) -> None:
        """Give each loader this rank's share: a slice of every training batch, every world-th test batch."""
        if self.world == 1:
            return
        for loader in (data.train, data.test):
            if not hasattr(loader, "shard"):
                raise ConfigError(f"devices={self.world}: the loader {type(loader).__name__} cannot be split "
                                  "across devices. Run it with devices=1.")
            loader.shard(self.rank, self.world)

    def wrap(self, model: torch.nn.Module, device: torch.device, sync_bn: bool) -> torch.nn.Module:
        """The model the loop trains: DistributedDataParallel around ``model`` (itself, with one process).

        ``model`` stays the object the method, the optimizer and the checkpoints refer to."""
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        if sync_bn:
            from qtrain.sync_batchnorm import convert_sync_batchnorm

            convert_sync_batchnorm(model, device)
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


SINGLE = Ranks()
_current = SINGLE


def current() -> Ranks:
    return _current


def device_of(ranks: Ranks, device: torch.device) -> torch.device:
    """Each rank its own GPU (LOCAL_RANK); the CPU is shared."""
    if device.type == "cuda" and ranks.world > 1:
        torch.cuda.set_device(ranks.local_rank)
        return torch.device("cuda", ranks.local_rank)
    return device


# ---------------------------------------------------------------------------------------------
# Joining and leaving the process group
# ---------------------------------------------------------------------------------------------


def join(timeout_s: float) -> Ranks:
    """Join the group torchrun or the launcher set up (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the
    environment). CPU tensors go through Gloo and CUDA tensors through NCCL. A collective that
    waits longer than ``timeout_s`` (a worker stuck or gone) fails instead of hanging."""
    global _current
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=float(timeout_s)))
    _current = Ranks(rank, world, int(os.environ.get("LOCAL_RANK", rank)))
    return _current


def leave(finished: bool = False) -> None:
    """Leave the group. ``finished``: this rank's work ended normally, so it first waits at a barrier
    for the others. Without it a rank that is done early (rank 0 still writes the result) tears down
    its Gloo connections while a peer's last collective may still be in flight, and Gloo can then
    abort the process ("terminate called without an active exception", seen once in CI). After a
    failure there is no barrier: the peers may be gone, and waiting would only delay the exit."""
    global _current
    if dist.is_initialized():
        if finished:
            try:
                dist.barrier()
            except Exception as e:  # a peer failed after its last collective: leave all the same
                log.warning("rank %d: the closing barrier failed (%s)", _current.rank, str(e).splitlines()[0])
        dist.destroy_process_group()
    _current = SINGLE


def quiet_other_ranks(rank: int) -> None:
    """Ranks other than 0 log only errors, each line marked with its rank; Python warnings (the same
    on every rank) are left to rank 0."""
    if rank == 0:
        return
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[rank {rank}] {LOG_FORMAT}"))
    root.addHandler(handler)
    root.setLevel(logging.ERROR)
    logging.getLogger("qtrain").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


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


def _worker(cfg_container: dict, run_dir: str, resume_dir: str | None, choices: dict, log_file: str | None,
            timeout_s: float):
    """One rank of ``qtrain devices=N`` (started by torch.distributed.elastic): the job's training, with
    the launcher's decision of what to resume."""
    from omegaconf import OmegaConf
    from torch.distributed.elastic.multiprocessing.errors import get_error_handler

    from qtrain.lifecycle import Interrupted, quit_on_signals_outside_training

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    quit_on_signals_outside_training()
    _setup_worker_logging(rank, log_file)
    if "OMP_NUM_THREADS" not in os.environ:  # the CPU's cores shared out between the ranks
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    finished = False
    try:
        join(timeout_s)
        from qtrain.run import train_job

        cfg = OmegaConf.create(cfg_container)
        OmegaConf.set_struct(cfg, True)
        result = train_job(cfg, Path(run_dir), None if resume_dir is None else Path(resume_dir), choices)
        finished = True
        return result if rank == 0 else None
    except QtrainError as e:  # for the launcher: the message and the exit code, no traceback
        if rank == 0 and not isinstance(e, Interrupted):  # (a stop is logged where it happens)
            log.info("%s", e)
        get_error_handler().record_exception(e)
        sys.exit(getattr(e, "exit_code", 2))
    except Exception as e:
        get_error_handler().record_exception(e)  # for the launcher's report
        if _peer_failure(e):  # another rank died or stalled: its own error is the one to show
            log.error("rank %d: a collective failed: %s", rank, str(e).splitlines()[0])
        else:
            log.exception("rank %d failed", rank)  # the traceback, once, in the log (rank 0) or on stderr
        sys.exit(1)
    finally:
        leave(finished)


def launch(cfg, run_dir: Path, resume_dir: Path | None, choices: dict, devices: int) -> dict:
    """Run the job (continuing ``resume_dir`` when given) on ``devices`` workers started by
    torch.distributed.elastic (as torchrun would, on a free port of this node) and return rank 0's
    result. A worker that fails takes the others down; its message (and exit code: 2 bad input,
    3 diverged, 130/143 stopped by a signal) becomes ours."""
    from omegaconf import OmegaConf
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from qtrain.lifecycle import EXIT_CODES, Interrupted

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=devices, run_id=f"qtrain-{uuid.uuid4().hex[:12]}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.2,
                          start_method="spawn", logs_specs=DefaultLogsSpecs(),
                          signals_to_handle="SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1")
    for name in ("torch.distributed.elastic", "torch.multiprocessing"):  # the workers report their own errors
        logging.getLogger(name).setLevel(logging.CRITICAL)
    timeout = float(cfg.get("collective_timeout_s", DEFAULT_TIMEOUT_S))
    args = (OmegaConf.to_container(cfg, resolve=True), str(run_dir), None if resume_dir is None else str(resume_dir),
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
                          EXIT_CODES.get(e.sigval.name, 128 + e.sigval.value), run_dir) from None
    except ChildFailedError as e:
        raise _failure(e, devices, run_dir, timeout) from None
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
        if method != multiprocessing.get_start_method(allow_none=True):
            multiprocessing.set_start_method(method, force=True)


QTRAIN_EXIT_CODES = (2, 3, 130, 143)
PEER_FAILURES = ("Timed out", "Connection closed by peer", "Connection reset by peer", "Broken pipe")


def _peer_failure(e: BaseException) -> bool:
    return isinstance(e, RuntimeError) and any(m in str(e) for m in PEER_FAILURES)


def _failure(error, devices: int, run_dir: Path, timeout: float) -> QtrainError:
    """The error of a failed group: rank 0's own message when it ended with one of qtrain's exit
    codes, else the first worker that failed."""
    from qtrain.lifecycle import Interrupted

    failures = error.failures
    rank, failure = (0, failures[0]) if 0 in failures and failures[0].exitcode in QTRAIN_EXIT_CODES \
        else error.get_first_failure()
    message = failure.message
    if isinstance(message, dict):  # an exception the worker recorded: its "Type: text" (the traceback is above)
        message = message.get("message", str(message))
    code = failure.exitcode
    if code in QTRAIN_EXIT_CODES:
        text = re.sub(r"^\w+: ", "", message)  # "ConfigError: ..." -> "..."
        if code in (130, 143):
            return Interrupted(text, code, run_dir)
        err = QtrainError(text)
        err.exit_code = code
        return err
    if "Timed out" in message:
        message += f" (a worker stopped answering for collective_timeout_s={timeout:g} s)"
    what = f"signal {-code}" if code < 0 else f"exit code {code}"
    err = QtrainError(f"worker {rank} of {devices} failed ({what}): {message}. The other workers were stopped; "
                      f"the run folder is {run_dir} (resume=true continues from its last checkpoint).")
    err.exit_code = 1  # a crash, not bad input
    return err
