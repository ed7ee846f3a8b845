"""The one interface every way of running a model offers: verification (ONNX Runtime against
PyTorch), quantization's agreement checks, ``Session`` and the benchmarks all call ``run``.

Backends: ``surgeon.export.ort_runner.OrtRunner`` (in-memory models, their weights fed from memory:
what verification runs), ``surgeon.runtime.backends.ort.OrtRunner`` (files, with a provider: CPU,
CUDA, TensorRT), ``surgeon.runtime.backends.tensorrt_engine.EngineRunner`` and
``surgeon.runtime.backends.torch_eager.TorchRunner``. numpy only is needed to name the types.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np


@runtime_checkable
class Runner(Protocol):
    """Logits for a preprocessed batch: ``run(batch [N, ...] float) -> [N, classes] float``."""

    backend: str  # e.g. "ort-cpu", "trt", "torch": reports and errors name it

    def run(self, batch: np.ndarray) -> np.ndarray: ...


def run_batched(runner: Runner, x: np.ndarray, batch: int = 32) -> np.ndarray:
    """Logits of ``x`` in chunks of ``batch`` (bounded activation memory for a large set of inputs)."""
    import numpy as np

    return np.concatenate([runner.run(x[i:i + batch]) for i in range(0, len(x), batch)])
