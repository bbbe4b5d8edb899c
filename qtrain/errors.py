"""Every error that reaches the user as one clear paragraph and a non-zero exit (no traceback), and
the exit codes qtrain's commands end with. The one place for both: the CLI, the launcher of a
data-parallel run and the tools all map errors to codes through here.

Exit codes: 0 done; 1 a crash (a bug, or a worker that died) or failed sweep jobs; 2 bad input (config, data, files,
a checkpoint); 3 the run diverged; 130 stopped by SIGINT, 143 by SIGTERM or SIGUSR1 (a resumable
checkpoint was saved first).
"""

from __future__ import annotations

EXIT_FAILED = 1  # a crash (a bug, a worker that died), or failed jobs of a sweep
EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
#: the code a run stopped by a signal ends with (SIGUSR1: what SLURM sends before preemption)
SIGNAL_EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143, "SIGUSR1": 143}
#: the codes that carry one of qtrain's own messages (a crash does not)
QTRAIN_EXIT_CODES = (EXIT_BAD_INPUT, EXIT_DIVERGED, *sorted(set(SIGNAL_EXIT_CODES.values())))


class QtrainError(Exception):
    """Base class: the message is written for the user, in full sentences."""

    exit_code = EXIT_BAD_INPUT


class ConfigError(QtrainError):
    """A config value that cannot work (unknown option, abits=0, negative epochs, ...)."""


class DataError(QtrainError):
    """A dataset that is missing or malformed and cannot be downloaded here."""


class DiskError(QtrainError):
    """The disk refused a write; nothing written before was lost."""


class CorruptCheckpoint(QtrainError):
    """No readable, verified checkpoint where one was expected."""


class Interrupted(QtrainError):
    """The run was stopped by a signal after saving a resumable checkpoint."""

    def __init__(self, message: str, exit_code: int, run_dir=None):
        super().__init__(message)
        self.exit_code, self.run_dir = exit_code, run_dir


class Diverged(QtrainError):
    """A non-finite loss or weight: the run stops, the last good checkpoint is kept."""

    exit_code = EXIT_DIVERGED

    def __init__(self, message: str, where: dict):
        super().__init__(message)
        self.where = where
