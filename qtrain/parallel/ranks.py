"""Data-parallel runs: which process is which, who writes, and the few collectives the loop needs.

A data-parallel run is N processes ("ranks") that train one model, each on its shard of every
batch, into one run folder. PyTorch does the work: ``torch.distributed`` for the process group
(Gloo on the CPU, NCCL for CUDA tensors), ``DistributedDataParallel`` for the gradient all-reduce,
and ``torch.distributed.elastic`` -- the engine behind torchrun -- to start the workers of
``qtrain devices=N`` and to bring the whole group down with the first worker's error when one dies
(qtrain/parallel/launcher.py: nothing here depends on it).

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
always ran. :func:`current_ranks` is this process's :class:`Ranks`, like torch.distributed's own group.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import logging
import os
import signal
import sys
import warnings

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from qtrain.errors import ConfigError, QtrainError

log = logging.getLogger("qtrain")
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # Hydra's default job log format
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
        if sync_bn:
            from qtrain.parallel.sync_batchnorm import convert_sync_batchnorm

            convert_sync_batchnorm(model, device)
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


SINGLE = Ranks()
_current = SINGLE


def current_ranks() -> Ranks:
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
        # Free now what may still hold Gloo work -- a DDP reducer or a synchronised batch norm's
        # last collective, often kept alive only by a reference cycle -- while the interpreter is
        # whole. Left to the collector at interpreter shutdown, Gloo's threads can release
        # tensors into a dying interpreter, and the process aborts with SIGABRT ("terminate
        # called without an active exception", seen once in CI after a clean run; the cause
        # pytorch/pytorch#179291 describes).
        gc.collect()
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
