"""Why a run stops before its last step: the errors ``mita train`` turns into a one-line message."""

from __future__ import annotations


class TrainError(RuntimeError):
    """A run cannot start or continue (bad settings, unusable output directory, mismatched resume)."""

    exit_code = 2


class Diverged(TrainError):
    """The training loss became NaN or infinite; nothing was saved after the last finite step."""


class Interrupted(TrainError):
    """SIGINT / SIGTERM stopped the run at a step boundary, after a checkpoint was saved."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
