"""ONNX Runtime: ``ort-cpu``, ``ort-cuda`` (onnxruntime-gpu), ``ort-trt`` (its TensorRT provider)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from surgeon.errors import SurgeonError

PROVIDERS = {
    "ort-cpu": ["CPUExecutionProvider"],
    "ort-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "ort-trt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
_INSTALL = {"ort-cuda": "pip install onnxruntime-gpu (and a CUDA GPU)",
            "ort-trt": "pip install onnxruntime-gpu with TensorRT libraries (and a CUDA GPU)"}


def available(backend: str) -> str | None:
    """None when ``backend`` can run here, else what to install."""
    import onnxruntime as ort

    missing = PROVIDERS[backend][0] not in ort.get_available_providers()
    return _INSTALL.get(backend, "pip install onnxruntime") if missing else None


def ort_errors() -> tuple[type[BaseException], ...]:
    """The exceptions ONNX Runtime raises for a model or an input it cannot run (its pybind classes)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    found = tuple(v for v in vars(state).values() if isinstance(v, type) and issubclass(v, Exception))
    return (*found, RuntimeError)


def ort_message(exc: BaseException) -> str:
    """ONNX Runtime's message in one readable line: without its ``[ONNXRuntimeError] : 2 : KIND :``
    prefix and the C++ source location and failed condition it embeds."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
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


class OrtRunner:
    """ONNX Runtime session over a model file (external data read from beside it, once
    :func:`~surgeon.export.onnx_io.load_onnx` has checked it). ``run`` is thread-safe: ONNX Runtime
    sessions allow concurrent runs."""

    def __init__(self, path: Path, backend: str, input_name: str, threads: int | None = None, *, checked: bool = False):
        why = available(backend)
        if why:
            raise SurgeonError(f"backend {backend} is not available here: {why}")
        if not checked:  # ONNX Runtime follows in-folder symbolic links: check the locations first
            from surgeon.export.onnx_io import load_onnx

            load_onnx(path, load_external_data=False)
        self.path = path
        self.session = open_session(str(path), PROVIDERS[backend], threads, what=str(path))
        self.backend = backend
        self.input_name = input_name
        self.dtype = np.float16 if self.session.get_inputs()[0].type == "tensor(float16)" else np.float32

    def run(self, batch: np.ndarray) -> np.ndarray:
        try:
            out = self.session.run(None, {self.input_name: batch.astype(self.dtype, copy=False)})[0]
        except ort_errors() as exc:
            raise SurgeonError(f"ONNX Runtime failed to run {self.path.name} on a batch of shape {list(batch.shape)}: "
                               f"{ort_message(exc)}") from None
        return out.astype(np.float32, copy=False)
