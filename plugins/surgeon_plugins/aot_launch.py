"""Run GrowNorm's ahead-of-time PTX the way a TensorRT engine does, on a GPU without TensorRT.

An engine built with the plugin embeds the PTX from :func:`grownorm_kernel.compile_ptx` and launches
it with ``cuLaunchKernel``: the grid, block and shared memory from the plugin's ``aot_impl``, and as
arguments exactly the inputs, TensorRT's extra int32 scalars and the outputs. :class:`AotKernel`
does the same through the CUDA driver API (``libcuda`` via ctypes: no extra dependency), so that
``benchmarks/gpu_check.py`` and the GPU tests verify and time the very kernel an engine would run.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class DriverError(RuntimeError):
    """A CUDA driver call failed, or the driver is missing."""


@functools.cache
def _driver() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        raise DriverError(f"the CUDA driver library libcuda.so.1 cannot be loaded: {exc}") from exc
    vp, uint = ctypes.c_void_p, ctypes.c_uint
    lib.cuGetErrorString.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
    lib.cuModuleLoadData.argtypes = [ctypes.POINTER(vp), ctypes.c_char_p]
    lib.cuModuleGetFunction.argtypes = [ctypes.POINTER(vp), vp, ctypes.c_char_p]
    lib.cuModuleUnload.argtypes = [vp]
    lib.cuLaunchKernel.argtypes = [vp, uint, uint, uint, uint, uint, uint, uint, vp, ctypes.POINTER(vp),
                                   ctypes.POINTER(vp)]
    return lib


def _check(result: int, what: str) -> None:
    if result != 0:
        text = ctypes.c_char_p()
        _driver().cuGetErrorString(result, ctypes.byref(text))
        raise DriverError(f"{what} failed: CUDA error {result} ({(text.value or b'unknown').decode()})")


def kernel_params(args: Sequence[tuple[str, int]]) -> tuple[ctypes.Array, list[Any]]:
    """``cuLaunchKernel``'s ``kernelParams``: one pointer per argument, to its value.

    ``args``: ``("ptr", address)`` (a 64-bit device pointer) or ``("i32", value)``.  Returns the
    array and the values it points to (keep both alive until the launch has been issued).
    """
    values: list[Any] = []
    for kind, value in args:
        if kind == "ptr":
            values.append(ctypes.c_uint64(int(value)))
        elif kind == "i32":
            if not -(2**31) <= int(value) < 2**31:
                raise ValueError(f"int32 kernel argument out of range: {value}")
            values.append(ctypes.c_int32(int(value)))
        else:
            raise ValueError(f"kernel argument kind must be 'ptr' or 'i32', got {kind!r}")
    array = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
    return array, values


@dataclass
class AotKernel:
    """The TensorRT-facing GrowNorm kernel (``X, GAMMA, N, S, Y``), loaded from its PTX."""

    name: str
    info: dict[str, Any]
    module: ctypes.c_void_p
    function: ctypes.c_void_p

    @classmethod
    def load(cls, name: str, ptx: str, info: dict[str, Any]) -> AotKernel:
        """Load PTX into the current CUDA context (the driver JIT-compiles it, as for an engine)."""
        torch.cuda.init()
        torch.empty(1, device="cuda")  # makes the device's primary context current on this thread
        module, function = ctypes.c_void_p(), ctypes.c_void_p()
        _check(_driver().cuModuleLoadData(ctypes.byref(module), ptx.encode()), "cuModuleLoadData")
        _check(_driver().cuModuleGetFunction(ctypes.byref(function), module, name.encode()), "cuModuleGetFunction")
        return cls(name, info, module, function)

    def __call__(self, x: torch.Tensor, gamma: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y = GrowNorm(x)`` on the current stream; ``x``/``y`` contiguous ``[N, C, ...]``, ``gamma`` fp32 ``[C]``."""
        for t in (x, gamma, y):
            if not (t.is_cuda and t.is_contiguous()):
                raise ValueError("AotKernel needs contiguous CUDA tensors")
        want = _DTYPES[self.info["dtype"]]
        if x.dtype != want or y.dtype != want or gamma.dtype != _DTYPES[self.info["gamma_dtype"]]:
            raise ValueError(f"this kernel was compiled for {self.info['dtype']} x/y and {self.info['gamma_dtype']} gamma, "
                             f"got {x.dtype}, {y.dtype} and {gamma.dtype}")
        c = self.info["channels"]
        if x.dim() < 2 or x.shape[1] != c or y.shape != x.shape or gamma.shape != (c,):
            raise ValueError(f"this kernel was compiled for C={c}: got x {tuple(x.shape)}, y {tuple(y.shape)}, "
                             f"gamma {tuple(gamma.shape)}")
        n = int(x.shape[0])
        s = 1
        for d in x.shape[2:]:
            s *= int(d)
        if self.info["rows"] and s != 1:
            raise ValueError(f"this kernel was compiled for the [N, C] layout (S == 1), got S = {s}")
        if x.numel() == 0:
            return y  # nothing to launch (a grid of 0 blocks is an error to the driver)
        grid = self.info["grid"](n, s)
        params, keep = kernel_params([("ptr", x.data_ptr()), ("ptr", gamma.data_ptr()), ("i32", n), ("i32", s),
                                      ("ptr", y.data_ptr())])
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        _check(_driver().cuLaunchKernel(self.function, int(grid[0]), int(grid[1]), int(grid[2]), self.info["block"], 1, 1,
                                        self.info["shared_mem"], stream, params, None), "cuLaunchKernel")
        del keep  # the driver copied the arguments when the launch was issued
        return y

    def unload(self) -> None:
        _check(_driver().cuModuleUnload(self.module), "cuModuleUnload")
