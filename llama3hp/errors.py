"""The one base class of user errors.

A `UserError` is bad input (a config, a data file, a checkpoint, a command line): its message is
ONE line naming the problem and what to do, and `llama3hp.cli.main` prints it as `error: ...` and
exits with code 2. Anything else that escapes is a bug in llama3hp: the CLI lets it show its
traceback and exit with code 1.

Each subclass also derives from the builtin a caller would catch without knowing llama3hp
(`ValueError` for bad values, `FileNotFoundError` for a missing file, ...).
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user; the message is one line that says what to do."""


class ConfigError(UserError, ValueError):
    """A bad config file, override or setting."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user pointed at does not exist or lacks what it must hold."""


class UsageError(UserError):
    """A bad command line."""
