"""The exceptions surgeon raises for bad input. The CLI prints them as one line and exits non-zero."""

from __future__ import annotations


class SurgeonError(Exception):
    """A user-facing error: the message is one line that says what is wrong and what to do."""


class GrowthError(SurgeonError):
    """Growth is ill-defined for the requested layer (or the layer does not exist)."""


class CheckpointError(SurgeonError):
    """A file is not a readable surgeon checkpoint."""


class DataError(SurgeonError):
    """A data set cannot be found or one of its images cannot be read."""


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (its type name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__
