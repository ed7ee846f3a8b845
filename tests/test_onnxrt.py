"""surgeon's ONNX Runtime sessions: exact int8 arithmetic on every x86 CPU."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from surgeon.onnxrt import open_session


def _qdq_conv(in_channels: int, activation: int) -> onnx.ModelProto:
    """x -> Q/DQ (uint8 or int8, scale 1/255) -> 1x1 Conv with int8 weights 127 (scale 1/127, so w = 1)
    -> Q/DQ -> y: every output is exactly ``in_channels * x`` while it stays in range; ONNX Runtime
    fuses it into one integer conv kernel."""
    qtype = {TensorProto.UINT8: np.uint8, TensorProto.INT8: np.int8}[activation]
    inits = [numpy_helper.from_array(np.array(1 / 255, np.float32), "xs"),
             numpy_helper.from_array(np.zeros((), qtype), "xz"),
             numpy_helper.from_array(np.full((4, in_channels, 1, 1), 127, np.int8), "wq"),
             numpy_helper.from_array(np.full(4, 1 / 127, np.float32), "ws"),
             numpy_helper.from_array(np.zeros(4, np.int8), "wz"),
             numpy_helper.from_array(np.array(in_channels / 127, np.float32), "ys"),
             numpy_helper.from_array(np.zeros((), qtype), "yz")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=0),
             helper.make_node("Conv", ["xd", "wd"], ["c"]),
             helper.make_node("QuantizeLinear", ["c", "ys", "yz"], ["cq"]),
             helper.make_node("DequantizeLinear", ["cq", "ys", "yz"], ["y"])]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, in_channels, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("activation", [TensorProto.UINT8, TensorProto.INT8], ids=["uint8", "int8"])
def test_int8_conv_is_exact_where_u8s8_kernels_saturate(activation):
    """Activations at the top of their range times weights 127: two such products already pass the
    16-bit sum that x86 CPUs without VNNI (AVX2, AVX-512F) saturate in ONNX Runtime's fast U8S8
    kernels. surgeon's sessions give the exact result on every CPU (on a VNNI CPU, or ARM, the
    fast kernels are exact anyway)."""
    channels = 64
    model = _qdq_conv(channels, activation)
    x = np.full((1, channels, 4, 4), 127 / 255 if activation == TensorProto.INT8 else 1.0, np.float32)
    y = open_session(model.SerializeToString(), ["CPUExecutionProvider"]).run(None, {"x": x})[0]
    exact = channels * x[0, 0, 0, 0]   # every weight dequantizes to 1
    np.testing.assert_allclose(y, np.full_like(y, exact), rtol=0.01)


@pytest.mark.parametrize(("flags", "machine", "expected"), [
    ("fpu sse4_1 avx2 fma", "x86_64", True),             # AVX2 EPYC / older Xeon: U8S8 saturates
    ("fpu avx2 avx512f avx512bw", "x86_64", True),        # AVX-512 without VNNI
    ("fpu avx2 avx512f avx512_vnni", "x86_64", False),
    ("fpu avx2 avx_vnni", "x86_64", False),
    ("fp asimd asimddp", "aarch64", False),               # ARM: no such kernels
    (None, "x86_64", None),                               # no flags line
])
def test_u8s8_saturates_reads_the_cpu_flags(tmp_path, monkeypatch, flags, machine, expected):
    import platform

    from surgeon.onnxrt import u8s8_saturates

    monkeypatch.setattr(platform, "machine", lambda: machine)
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\n" + (f"flags\t\t: {flags}\n" if flags else "model name\t: x\n"))
    assert u8s8_saturates(str(info)) is expected
    assert u8s8_saturates(str(tmp_path / "missing")) is (False if machine == "aarch64" else None)
