"""A run's life cycle, apart from building objects and apart from the loop: its directory (unique,
locked while a process trains in it, stale temporary files removed), and how it ends early
(signals, divergence).

- :func:`unique_dir` is the ``${unique_dir:...}`` resolver of configs/config.yaml: it creates the
  run (or sweep) directory *exclusively* and, when the name is taken (two runs started in the
  same second, by two users or two SLURM jobs), picks ``name-2``, ``name-3``, ...
- :class:`RunLock` holds an exclusive ``flock`` on ``<run_dir>/.lock`` while a process trains in
  it; a second process gets one paragraph naming the holder (pid, host, start time) and exit 2.
- :class:`LogAlsoInto`: while a process trains in a folder that is not its own (a resumed run, the
  cached float model of init=float), its log lines are also appended to that folder's log, so a run's
  folder holds the log of every process that trained it (Hydra writes each invocation's log into the
  invocation's own new folder).
- :class:`StopSignals`: SIGINT, SIGTERM and SIGUSR1 (what SLURM sends before preemption with
  ``--signal``) set a flag that the loop reads after each step; the run then saves a resumable
  checkpoint at that step and ends with exit 130 (SIGINT) or 143 (SIGTERM, SIGUSR1). A second
  SIGINT/SIGTERM quits at once (in a data-parallel run: a second one more than a few seconds later,
  as the launcher forwards the terminal's Ctrl-C to workers that received it already).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from qtrain.errors import SIGNAL_EXIT_CODES, ConfigError
from qtrain.fileio import write_refused

_created: dict[str, str] = {}  # per process: the same name always resolves to the same directory


def unique_dir(path: str) -> str:
    """Create ``path`` exclusively (or ``path-2``, ``path-3``, ... when taken) and return its name."""
    if path in _created:
        return _created[path]
    base = Path(path)
    try:
        base.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"Cannot create the output folder {base.parent}: {e.strerror}. Set out_dir= to a "
                          "writable folder.") from None
    for i in range(1, 10_000):
        cand = base if i == 1 else base.with_name(f"{base.name}-{i}")
        try:
            cand.mkdir()
        except FileExistsError:
            continue
        except OSError as e:
            raise ConfigError(f"Cannot create the run folder {cand}: {e.strerror}. Set out_dir= to a writable "
                              "folder.") from None
        _created[path] = str(cand)
        return str(cand)
    raise ConfigError(f"{path}: 10,000 run folders of that name exist already.")


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Temporary files (``.*.tmp-<pid>``) left by dead processes. Called under the run lock, so no
    live process of ours is writing there."""
    removed = []
    for tmp in list(run_dir.glob(".*.tmp-*")) + list(run_dir.glob("checkpoints/.*.tmp-*")):
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def check_writable(run_dir: Path, how: str) -> None:
    """Before anything is trained: a run continues in its own folder (checkpoints, metrics, its log), so a
    folder that cannot be written (read-only, no permission, full) is one paragraph and exit 2."""
    refused = write_refused(run_dir)
    if refused:
        raise ConfigError(f"{how}: the run folder {run_dir} cannot be written ({refused}), and a resumed run "
                          "continues in its own folder (checkpoints, metrics.jsonl, its log). Copy it somewhere "
                          f"writable and resume the copy (cp -r {run_dir} <new folder>, then qtrain resume=<new "
                          f"folder>), or evaluate it as it is: qtrain-eval {run_dir}.")


class RunLock:
    """An exclusive, non-blocking flock on ``<run_dir>/.lock`` for as long as a process trains there.

    flock is released by the kernel when the process dies (kill -9 included), so a dead run never
    blocks its own resume. (On NFS, flock support depends on the server.)
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self.fd = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 300, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise ConfigError(f"The run folder {self.path.parent} is in use: {holder} is training in it. "
                                  "Two processes must not train into one folder; wait for it to finish (or stop "
                                  "it), then resume.") from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()} since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


class LogAlsoInto:
    """Append this process's log lines to ``run_dir``'s log file as well, while it trains there.

    Only when the process logs to a file (Hydra's job log) that is not in ``run_dir`` already: the
    copy takes that file's name, format and level, and starts with a line naming the process's own log.
    """

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir).resolve()
        self.handler = None

    def __enter__(self):
        files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
        if not files or any(Path(h.baseFilename).parent == self.run_dir for h in files):
            return self
        own = files[0]
        handler = logging.FileHandler(self.run_dir / Path(own.baseFilename).name, mode="a", delay=True)
        handler.setFormatter(own.formatter)
        handler.setLevel(own.level)
        logging.getLogger().addHandler(handler)
        self.handler = handler
        logging.getLogger("qtrain").info("training in this folder in process %d, whose own log (from its start) "
                                         "is %s", os.getpid(), own.baseFilename)
        return self

    def __exit__(self, *exc):
        if self.handler is not None:
            logging.getLogger().removeHandler(self.handler)
            self.handler.close()
            self.handler = None


def quit_on_signals_outside_training() -> None:
    """Before and after the loop (imports, data loading, the final result) there is no step to
    finish: a signal ends the process at once with one line instead of a traceback or silence.
    :class:`StopSignals` replaces this while the loop runs."""

    def handle(signum, frame):
        name = signal.Signals(signum).name
        print(f"\nqtrain: {name} outside training: stopped (nothing was lost: checkpoints are only ever replaced "
              "atomically).", file=sys.stderr, flush=True)
        sys.exit(SIGNAL_EXIT_CODES.get(name, 130))

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, handle)


class StopSignals:
    """Turn SIGINT / SIGTERM / SIGUSR1 into a request the loop honours after the current step.

    Only installed in the main thread (Python delivers signals there); elsewhere it is inert.
    A repeat within ``repeat_window`` seconds of the first signal counts as the same request.
    """

    def __init__(self, repeat_window: float = 0.0):
        self.requested: str | None = None
        self._previous = {}
        self.repeat_window, self._first_at = repeat_window, None

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.requested is not None and self._first_at is not None \
                and time.monotonic() - self._first_at < self.repeat_window:
            return
        if self.requested is not None and signum != signal.SIGUSR1:
            print(f"\nqtrain: second {name}: quitting now, without saving (the last checkpoint is kept).",
                  file=sys.stderr, flush=True)
            os._exit(SIGNAL_EXIT_CODES.get(name, 130))
        if self.requested is None:
            self.requested, self._first_at = name, time.monotonic()
            print(f"\nqtrain: {name} received: finishing the current step, then saving a checkpoint "
                  "(press Ctrl-C again to quit at once).", file=sys.stderr, flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def exit_code(self) -> int:
        return SIGNAL_EXIT_CODES.get(self.requested or "", 130)
