"""TensorRT engines (``.engine``/``.plan``): full TensorRT, or TensorRT-RTX for engines it built.

No PyTorch: the engine's I/O buffers and stream come from Polygraphy's CUDA runtime wrapper
(``polygraphy.cuda``, NVIDIA's TensorRT toolkit; ctypes over ``libcudart``, which TensorRT's wheels
bring), so an inference box needs TensorRT and numpy only. One execution context per runner, used
under a lock (contexts are not thread-safe); the device buffers grow to the largest batch seen and
are reused."""

from __future__ import annotations

import importlib
import threading
from pathlib import Path

import numpy as np

from surgeon import cuda
from surgeon.errors import SurgeonError


def available(rtx: bool) -> str | None:
    """None when such engines can run here, else what is missing."""
    module = "tensorrt_rtx" if rtx else "tensorrt"
    try:
        importlib.import_module(module)
    except Exception:
        return f"`{module}` is not installed ({'pip install tensorrt-rtx-cu12' if rtx else 'install TensorRT 10.9+'})"
    try:
        importlib.import_module("polygraphy.cuda")
    except ImportError:
        return "Polygraphy is needed for the engine's GPU buffers (pip install polygraphy)"
    if not cuda.available():
        return "no CUDA GPU is visible"
    return None


class EngineRunner:
    def __init__(self, path: Path, input_name: str, output_name: str, rtx: bool):
        why = available(rtx)
        if why:
            raise SurgeonError(f"cannot run {path.name}: {why}")
        from polygraphy import cuda as pcuda
        from polygraphy.datatype import DataType

        from surgeon.trt.toolkit import logger_for

        trt = importlib.import_module("tensorrt_rtx" if rtx else "tensorrt")
        self._log = logger_for(trt)
        self._runtime = trt.Runtime(self._log.native)
        self.engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            why = self._log.errors[-1].splitlines()[0][:300] if self._log.errors else "not an engine for this TensorRT"
            raise SurgeonError(f"TensorRT cannot load {path.name}: {why}")
        self.context = self.engine.create_execution_context()
        self.input_name, self.output_name = input_name, output_name
        self.backend = "trt"
        dtypes = {trt.float32: np.float32, trt.float16: np.float16}
        self._in_dtype = np.dtype(dtypes[self.engine.get_tensor_dtype(input_name)])
        self._out_dtype = np.dtype(dtypes[self.engine.get_tensor_dtype(output_name)])
        self._stream = pcuda.Stream()
        self._in = pcuda.DeviceArray(dtype=DataType.from_dtype(self._in_dtype))
        self._out = pcuda.DeviceArray(dtype=DataType.from_dtype(self._out_dtype))
        self._lock = threading.Lock()

    def run(self, batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(batch, dtype=self._in_dtype)
        with self._lock:
            if not self.context.set_input_shape(self.input_name, tuple(x.shape)):  # outside the engine's profile
                raise SurgeonError(f"the engine cannot take a batch of shape {list(x.shape)} for {self.input_name} "
                                   f"(outside its optimization profile: rebuild it with `surgeon build --batch`)")
            out = np.empty(tuple(self.context.get_tensor_shape(self.output_name)), dtype=self._out_dtype)
            self._in.resize(x.shape).copy_from(x, self._stream)
            self._out.resize(out.shape)
            self.context.set_tensor_address(self.input_name, self._in.ptr)
            self.context.set_tensor_address(self.output_name, self._out.ptr)
            if not self.context.execute_async_v3(self._stream.ptr):
                raise SurgeonError("TensorRT failed to run the engine")
            self._out.copy_to(out, self._stream)
            self._stream.synchronize()  # `x` and `out` are pageable host memory: alive until here
        return out.astype(np.float32, copy=False)
