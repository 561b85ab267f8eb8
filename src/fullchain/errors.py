"""User-facing errors: anything a user can fix by changing input raises `UserError`.

The CLI turns a `UserError` into one line on stderr and exit code 2, never a traceback.
Everything else is a bug in fullchain and keeps its traceback.
"""

import sys


class UserError(Exception):
    """A mistake in the user's input (config, file, flag) with a message that says how to fix it."""

    exit_code = 2


class MissingDatasetError(UserError):
    """A dataset package or file is not installed; the message names the install command."""


class TrainingStopped(Exception):
    """Training stopped on a signal after saving a checkpoint; the CLI exits with 128 + the signal number."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def one_line(exc: BaseException) -> str:
    """An exception as ``Type: message`` on one line, for messages that quote a failure from user code."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def report(exc: BaseException, style: str = "bold red", prefix: str = "error: ") -> None:
    """One line on stderr for a user-facing error: the same look from the CLI and from torchrun workers."""
    from rich.console import Console

    Console(stderr=True, file=sys.stderr).print(f"[{style}]{prefix}[/]{exc}", highlight=False, soft_wrap=True)
