"""The PTX a TensorRT engine embeds, launched as the engine launches it (``surgeon_plugins.aot_launch``).

Here: the argument packing ``cuLaunchKernel`` receives.  On a CUDA GPU (skipped otherwise): the
trimmed PTX from ``compile_ptx``, JIT-compiled by the driver and launched with exactly the five
arguments TensorRT passes, against the float64 composite, for both layouts, fp32 and fp16, and
every tactic's tile size.
"""

from __future__ import annotations

import ctypes

import pytest
import torch

from surgeon.grow.grownorm import grow_norm

pytest.importorskip("triton")


def test_kernel_params_point_at_each_value_in_order():
    from surgeon_plugins.aot_launch import kernel_params

    array, values = kernel_params([("ptr", 0x7F00_0000_1000), ("ptr", 2**64 - 16), ("i32", 5), ("i32", -3),
                                   ("ptr", 0)])
    assert len(array) == len(values) == 5
    as_u64 = [ctypes.cast(array[i], ctypes.POINTER(ctypes.c_uint64)).contents.value for i in (0, 1, 4)]
    as_i32 = [ctypes.cast(array[i], ctypes.POINTER(ctypes.c_int32)).contents.value for i in (2, 3)]
    assert as_u64 == [0x7F00_0000_1000, 2**64 - 16, 0] and as_i32 == [5, -3]
    assert [ctypes.sizeof(v) for v in values] == [8, 8, 4, 4, 8]  # what the PTX's .u64/.u32 params read
    with pytest.raises(ValueError, match="out of range"):
        kernel_params([("i32", 2**31)])
    with pytest.raises(ValueError, match="'ptr' or 'i32'"):
        kernel_params([("f32", 1)])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape, groups", [((6, 1000, 7, 7), (600, 400)), ((33, 5120), (4096, 1024)),
                                           ((2, 3, 5, 5), (1, 2)), ((4, 130, 3, 1), (64, 66)),
                                           ((8, 512, 14, 14), (448, 64))])  # the last: tactic 4 is whole-group
def test_aot_ptx_launched_like_tensorrt_matches_the_reference(gk, dtype, shape, groups):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from surgeon_plugins.aot_launch import AotKernel
    from surgeon_plugins.grownorm_trt import TACTICS, aot_kernel

    major, minor = torch.cuda.get_device_capability()
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(shape, device="cuda", generator=g).to(dtype)
    x[0, : groups[0]] = 0  # an all-zero group: eps keeps it finite
    gamma = torch.rand(shape[1], device="cuda", generator=g) * 3 + 0.5
    ref = grow_norm(x.double(), groups, gamma.double(), 1e-6)
    label = "fp32" if dtype == torch.float32 else "fp16"
    for tactic in TACTICS:
        name, ptx, _, info = aot_kernel(groups, 1e-6, label, (-1,) + tuple(shape[1:]), tactic, major * 10 + minor)
        kernel = AotKernel.load(name, ptx, info)
        try:
            y = kernel(x, gamma, torch.full_like(x, float("nan")))
            torch.cuda.synchronize()
        finally:
            kernel.unload()
        err = float((y.double() - ref).abs().max() / ref.abs().max())
        assert err <= (1e-5 if dtype == torch.float32 else 2e-3), (tactic, err)
    kernel = AotKernel.load(name, ptx, info)
    with pytest.raises(ValueError, match="compiled for C="):
        kernel(x[:, :1].contiguous(), gamma[:1].contiguous(), x[:, :1].contiguous())
    with pytest.raises(ValueError, match=f"compiled for {label} x/y"):
        kernel(x.double(), gamma, x.double())
    kernel.unload()
