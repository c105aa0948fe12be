"""Errors of a training stage that a user can act on; retrying would not help."""

from __future__ import annotations


class TrainingError(ValueError):
    """The stage cannot train as configured; the message says what to change."""


class CheckpointMismatchError(TrainingError):
    """The run's checkpoint does not fit the model it is resumed with."""


class DivergedError(TrainingError):
    """The loss (or gradient norm) became NaN or inf; `step` is the step that produced it."""

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step

    def __reduce__(self):
        return (self.__class__, (str(self), self.step))


ERRORS = {cls.__name__: cls for cls in (TrainingError, CheckpointMismatchError, DivergedError)}
