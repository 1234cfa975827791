"""The project's own errors: failures a user causes and can fix, printed as one `error:` line by the stage runner.

Each names the file or field at fault, what is wrong and the fix: `error: <where>: <what>; <fix>`. Anything else
that escapes a stage is a bug and keeps its traceback. The subclasses also derive from the builtin a caller
would expect (ValueError, OSError, RuntimeError), so `except ValueError` still catches a bad input.
"""
from __future__ import annotations


class MitdetError(Exception):
    """A user-caused failure; `exit_code` is what a stage exits with."""

    exit_code = 1

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None):
        self.what, self.where, self.fix = what, where, fix
        text = f"{where}: {what}" if where else what
        super().__init__(f"{text}; {fix}" if fix else text)


class ParamsError(MitdetError, ValueError):
    """A params.yaml key that is missing, unknown, of the wrong type or out of range."""

    exit_code = 2


class DataError(MitdetError, ValueError):
    """Input data that cannot be used: a missing index, malformed COCO JSON, an unreadable dataset file."""


class DownloadError(MitdetError, OSError):
    """A download that failed, was cut short or does not verify."""


class CheckpointError(MitdetError, RuntimeError):
    """A checkpoint or saved model that is missing, unreadable, or belongs to another model."""


class TrainingError(MitdetError, RuntimeError):
    """Training cannot go on: non-finite losses, out of memory, another trainer on the same folder."""
