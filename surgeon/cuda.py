"""Whether a CUDA GPU is visible, through the driver (``libcuda``) with ctypes: no PyTorch needed.

The deploy side (``Session``'s ``auto`` backend, ``surgeon build``'s choice of TensorRT) asks this
instead of ``torch.cuda``; ``CUDA_VISIBLE_DEVICES`` applies as it does to every CUDA program.
"""

from __future__ import annotations

import ctypes
import functools


@functools.lru_cache(maxsize=1)
def _driver() -> ctypes.CDLL | None:
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        return lib if lib.cuInit(0) == 0 else None
    return None


@functools.lru_cache(maxsize=1)
def device_count() -> int:
    """Visible CUDA devices (0 without a driver or a GPU)."""
    lib = _driver()
    if lib is None:
        return 0
    count = ctypes.c_int(0)
    return count.value if lib.cuDeviceGetCount(ctypes.byref(count)) == 0 else 0


def available() -> bool:
    return device_count() > 0


def device_name(index: int = 0) -> str:
    """The name of CUDA device ``index`` ("a CUDA GPU" where the driver does not say)."""
    lib = _driver()
    device, name = ctypes.c_int(0), ctypes.create_string_buffer(256)
    if lib is None or lib.cuDeviceGet(ctypes.byref(device), index) != 0 or lib.cuDeviceGetName(name, 256, device) != 0:
        return "a CUDA GPU"
    return name.value.decode(errors="replace")
