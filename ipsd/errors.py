"""The errors a user can cause and fix: the command line prints them as one ``ipsd: error:`` line."""
from __future__ import annotations


class IpsdError(Exception):
    """Base of every user-facing error; ``exit_code`` is the command's exit status."""

    exit_code = 1


class ConfigError(IpsdError, ValueError):
    """A config the user wrote is invalid; the message names the key and the fix."""

    exit_code = 2


class DataError(IpsdError, RuntimeError):
    """Missing/corrupt/unreadable data; the message names the file and the fix."""


class RecordError(IpsdError, ValueError):
    """A run file exists but cannot be used; the message names the file, what is wrong and the fix."""


class NonFiniteLoss(IpsdError, RuntimeError):
    """Training diverged; the run folder keeps the last good checkpoint."""


class Interrupted(IpsdError):
    """Ctrl-C (or SIGINT) stopped training; the run folder keeps its last checkpoint and resumes from it."""

    exit_code = 130  # the shell's convention for SIGINT
