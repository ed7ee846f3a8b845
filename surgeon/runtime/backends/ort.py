"""ONNX Runtime: ``ort-cpu``, ``ort-cuda`` (onnxruntime-gpu), ``ort-trt`` (its TensorRT provider)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from surgeon.errors import SurgeonError
from surgeon.onnxrt import open_session, ort_errors, ort_message  # noqa: F401  (re-exported)

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
