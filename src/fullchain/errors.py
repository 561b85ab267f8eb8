"""User-facing errors: anything a user can fix by changing input raises `UserError`.

The CLI turns a `UserError` into one line on stderr and exit code 2, never a traceback.
Everything else is a bug in fullchain and keeps its traceback.
"""


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
