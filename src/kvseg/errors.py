"""The errors kvseg reports to a user as one line (``kvseg CMD: error: ...``, exit code 2).

Everything a user can get wrong, or a file or folder that is missing, unreadable or malformed,
raises a :class:`KvsegError` subclass (or an ``OSError`` from the file system) whose message
names the option, file, line or row at fault. Any other exception reaching the command line is a
bug in kvseg and is shown with its traceback and a line saying so.

The subclasses also derive from ``ValueError`` so code written against the earlier
``ValueError`` contract keeps working.
"""

from __future__ import annotations


class KvsegError(Exception):
    """Base class: a user mistake or an input fault, reported as one line."""


class ConfigError(KvsegError, ValueError):
    """A bad option value, an unknown option, or a config/preset file that does not validate."""


class DataError(KvsegError, ValueError):
    """A dataset file or folder that is malformed (the message names the file and line/row)."""


class CheckpointError(KvsegError, ValueError):
    """A weights or checkpoint file that is corrupt, truncated, foreign or does not fit."""


class RunDirError(KvsegError, ValueError):
    """An output folder that cannot be used as asked (another process owns it, it holds a run
    that would be overwritten, it holds files kvseg did not write)."""


__all__ = ["CheckpointError", "ConfigError", "DataError", "KvsegError", "RunDirError"]
