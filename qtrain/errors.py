"""Errors that reach the user as one clear paragraph and a non-zero exit (no traceback)."""


class QtrainError(Exception):
    """Base class: the message is written for the user, in full sentences."""

    exit_code = 2


class ConfigError(QtrainError):
    """A config value that cannot work (unknown option, abits=0, negative epochs, ...)."""


class DataError(QtrainError):
    """A dataset that is missing or malformed and cannot be downloaded here."""
