"""TensorRT engines (``.engine``/``.plan``): full TensorRT, or TensorRT-RTX for engines it built.

Buffers are PyTorch CUDA tensors; one execution context per runner, used under a lock (contexts
are not thread-safe)."""

from __future__ import annotations

import importlib
import threading
from pathlib import Path

import numpy as np

from surgeon.errors import SurgeonError


def available(rtx: bool) -> str | None:
    """None when such engines can run here, else what is missing."""
    module = "tensorrt_rtx" if rtx else "tensorrt"
    try:
        importlib.import_module(module)
    except Exception:
        return f"`{module}` is not installed ({'pip install tensorrt-rtx-cu12' if rtx else 'install TensorRT 10.9+'})"
    try:
        import torch

        if not torch.cuda.is_available():
            return "no CUDA GPU is visible"
    except ImportError:
        return "PyTorch is needed for the engine's GPU buffers"
    return None


class EngineRunner:
    def __init__(self, path: Path, input_name: str, output_name: str, rtx: bool):
        why = available(rtx)
        if why:
            raise SurgeonError(f"cannot run {path.name}: {why}")
        import torch

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
        self._torch = torch
        self._stream = torch.cuda.Stream()
        self._lock = threading.Lock()
        self.backend = "trt"
        dtypes = {trt.float32: torch.float32, trt.float16: torch.float16}
        self._in_dtype = dtypes[self.engine.get_tensor_dtype(input_name)]
        self._out_dtype = dtypes[self.engine.get_tensor_dtype(output_name)]

    def run(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        with self._lock, torch.cuda.stream(self._stream):
            x = torch.from_numpy(np.ascontiguousarray(batch)).to("cuda", self._in_dtype, non_blocking=True)
            if not self.context.set_input_shape(self.input_name, tuple(x.shape)):  # outside the engine's profile
                raise SurgeonError(f"the engine cannot take a batch of shape {list(x.shape)} for {self.input_name} "
                                   f"(outside its optimization profile: rebuild it with `surgeon build --batch`)")
            y = torch.empty(tuple(self.context.get_tensor_shape(self.output_name)), device="cuda", dtype=self._out_dtype)
            self.context.set_tensor_address(self.input_name, x.data_ptr())
            self.context.set_tensor_address(self.output_name, y.data_ptr())
            if not self.context.execute_async_v3(self._stream.cuda_stream):
                raise SurgeonError("TensorRT failed to run the engine")
            out = y.float().cpu()
        return out.numpy()
