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


class MissingExtraError(SurgeonError):
    """A feature needs packages of an extra this install lacks (the deploy-only base install has no PyTorch)."""


# Modules only the `train` extra brings (the base install is the deploy side), by top-level name.
TRAIN_MODULES = ("torch", "torchvision", "onnxscript", "onnx_graphsurgeon", "sklearn", "matplotlib", "tqdm", "timm",
                 "triton")


def missing_extra(exc: ImportError, what: str = "this") -> MissingExtraError | None:
    """A one-line error naming the extra to install, when ``exc`` is the import of a training-only
    module failing (None for any other import error)."""
    name = (getattr(exc, "name", None) or "").split(".")[0]
    if name not in TRAIN_MODULES:
        return None
    return MissingExtraError(f"{what} needs {name}, which comes with the training extra: pip install 'surgeon[train]' "
                             f"(this install has the deploy side only: predict, bench, build and serve on .onnx and "
                             f".engine files)")


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (its type name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__
