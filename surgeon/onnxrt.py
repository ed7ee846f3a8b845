"""ONNX Runtime helpers every stage shares (export's verification and the runtime's backends): a quiet
session with a one-line error, and ONNX Runtime's exceptions and messages made readable.

Below both export/ and runtime/, so verification does not import the runtime (data flows one way).
"""

from __future__ import annotations

import re

from surgeon.errors import SurgeonError, first_line


def ort_errors() -> tuple[type[BaseException], ...]:
    """The exceptions ONNX Runtime raises for a model or an input it cannot run (its pybind classes)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    found = tuple(v for v in vars(state).values() if isinstance(v, type) and issubclass(v, Exception))
    return (*found, RuntimeError)


def ort_message(exc: BaseException) -> str:
    """ONNX Runtime's message in one readable line: without its ``[ONNXRuntimeError] : 2 : KIND :``
    prefix and the C++ source location and failed condition it embeds."""
    text = first_line(exc)
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    text = re.sub(r"\S*onnxruntime_src/\S+:\d+ .*? was false\. ", "", text)
    return text[:300]


def open_session(source: str | bytes, providers: list[str], threads: int | None = None, what: str = "the model"):
    """An ONNX Runtime session (quiet logging) or a one-line SurgeonError naming ``what``."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(source, opts, providers=providers)
    except Exception as exc:
        raise SurgeonError(f"ONNX Runtime cannot load {what}: {ort_message(exc)}") from None
