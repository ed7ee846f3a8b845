"""ONNX Runtime: ``ort-cpu``, ``ort-cuda`` (onnxruntime-gpu), ``ort-trt`` (its TensorRT provider)."""

from __future__ import annotations

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
        raise SurgeonError(f"ONNX Runtime cannot load {what}: {str(exc).splitlines()[0][:300]}") from None


class OrtRunner:
    """ONNX Runtime session over a model file (external data read from beside it). ``run`` is
    thread-safe: ONNX Runtime sessions allow concurrent runs."""

    def __init__(self, path: Path, backend: str, input_name: str, threads: int | None = None):
        why = available(backend)
        if why:
            raise SurgeonError(f"backend {backend} is not available here: {why}")
        self.session = open_session(str(path), PROVIDERS[backend], threads, what=str(path))
        self.backend = backend
        self.input_name = input_name
        self.dtype = np.float16 if self.session.get_inputs()[0].type == "tensor(float16)" else np.float32

    def run(self, batch: np.ndarray) -> np.ndarray:
        out = self.session.run(None, {self.input_name: batch.astype(self.dtype, copy=False)})[0]
        return out.astype(np.float32, copy=False)
