"""Which TensorRT builds the engine: full TensorRT on a CUDA machine, else TensorRT-RTX CPU-only.

Both ship the same builder and ONNX parser API under different module names (``tensorrt`` and
``tensorrt_rtx``). Full TensorRT needs a GPU to build; TensorRT-RTX builds ahead of time without one
(a portable engine for RTX-class GPUs) but has no plugin layers.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from surgeon.errors import SurgeonError
from surgeon.spec import BUILDERS

CHOICES = BUILDERS
INSTALL_HINT = "install `tensorrt` (10.9+, on a machine with a CUDA GPU) or `pip install tensorrt-rtx-cu12` (CPU-only builds)"


@dataclass(frozen=True)
class Toolkit:
    name: str            # "tensorrt" | "tensorrt-rtx"
    module: ModuleType
    ahead_of_time: bool  # built without a GPU (TensorRT-RTX)

    @property
    def version(self) -> str:
        return str(getattr(self.module, "__version__", "?"))

    def describe(self) -> str:
        if self.ahead_of_time:
            return (f"TensorRT-RTX {self.version}, CPU-only ahead-of-time build: a portable engine for RTX-class "
                    f"GPUs (compute capability 8.6, 8.9, 12.0 and later); it is compiled for the exact GPU on first load")
        return f"TensorRT {self.version} on {_gpu_name()}"

    def logger(self) -> "CollectingLogger":
        return logger_for(self.module)


def _import(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except Exception:  # ImportError, or a broken install raising while it loads its libraries
        return None


def _has_gpu() -> bool:
    from surgeon import cuda

    return cuda.available()


def _gpu_name() -> str:
    from surgeon import cuda

    return cuda.device_name()


def find_toolkit(choice: str = "auto") -> Toolkit:
    """The builder to use; ``choice``: auto (TensorRT with a GPU, else TensorRT-RTX), tensorrt, tensorrt-rtx."""
    if choice not in CHOICES:
        raise SurgeonError(f"--builder must be one of {', '.join(CHOICES)}, got {choice!r}")
    if choice in ("auto", "tensorrt"):
        trt = _import("tensorrt")
        if trt is not None and _has_gpu():
            return Toolkit("tensorrt", trt, ahead_of_time=False)
        if choice == "tensorrt":
            why = "no CUDA GPU is visible" if trt is not None else "`tensorrt` is not installed"
            raise SurgeonError(f"--builder tensorrt: {why}; {INSTALL_HINT}")
    rtx = _import("tensorrt_rtx")
    if rtx is not None:
        return Toolkit("tensorrt-rtx", rtx, ahead_of_time=True)
    if choice == "tensorrt-rtx":
        raise SurgeonError("--builder tensorrt-rtx: `tensorrt_rtx` is not installed; pip install tensorrt-rtx-cu12")
    trt_missing = _import("tensorrt") is None
    why = "no TensorRT is installed" if trt_missing else "`tensorrt` is installed but no CUDA GPU is visible"
    raise SurgeonError(f"cannot build a TensorRT engine: {why}; {INSTALL_HINT}")


class CollectingLogger:
    """A TensorRT logger that keeps errors and warnings (for one-line error messages and reports)."""

    def __init__(self, trt: ModuleType):
        self.errors: list[str] = []
        self.warnings: list[str] = []
        logger = self

        class _Logger(trt.ILogger):  # type: ignore[misc, name-defined]
            def __init__(self) -> None:
                trt.ILogger.__init__(self)

            def log(self, severity: Any, msg: str) -> None:
                if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                    logger.errors.append(msg)
                elif severity == trt.ILogger.Severity.WARNING:
                    logger.warnings.append(msg)

        self.native = _Logger()

    def reset(self) -> None:
        self.errors.clear()
        self.warnings.clear()


_LOGGERS: dict[str, CollectingLogger] = {}


def logger_for(trt: ModuleType) -> CollectingLogger:
    # TensorRT keeps the first logger a process gives it: make exactly one per module, and reuse it.
    if trt.__name__ not in _LOGGERS:
        _LOGGERS[trt.__name__] = CollectingLogger(trt)
    return _LOGGERS[trt.__name__]
