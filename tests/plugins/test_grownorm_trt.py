"""The TensorRT plugin ``surgeon::GrowNorm``.

Everywhere: the PTX it embeds for each tactic and input layout compiles for sm_80/sm_90 and has the
parameters TensorRT passes (``X, GAMMA, N, S, Y``; Triton's two unused scratch pointers dropped), and
surgeon's builder says why the plugin cannot be used when it cannot.

With full TensorRT and a GPU (skipped otherwise; the one command to verify it there is
``pytest tests/plugins/test_grownorm_trt.py``): the plugin registers, an exported grown model builds
with one plugin layer per GrowNorm node, and the engine — deserialized in a fresh process that never
imports the plugin's Python code — matches ONNX Runtime.
"""

from __future__ import annotations

import json
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from surgeon.trt.plugin import plugin_status
from surgeon.trt.toolkit import Toolkit

pytest.importorskip("triton")


@pytest.mark.parametrize("shape, groups, rows", [((-1, 5120), (4096, 1024), True), ((-1, 576, 7, 7), (512, 64), False),
                                                 ((-1, 3, 5, 5), (1, 2), False)])
@pytest.mark.parametrize("arch", [80, 90])
def test_aot_kernel_for_every_tactic(gk, shape, groups, rows, arch):
    from surgeon_plugins.grownorm_trt import TACTICS, aot_kernel

    seen = set()
    for tactic in TACTICS:
        name, ptx, cfg, info = aot_kernel(groups, 1e-6, "fp32", shape, tactic, arch)
        assert cfg.rows == rows and info["params"] == ("X", "GAMMA", "N", "S", "Y")
        assert f".entry {name}" in ptx and info["target"].startswith(f"sm_{arch}")
        assert len(gk.ptx_entry_params(ptx, name)) == 5 and info["cubin"][:4] == b"\x7fELF"
        assert info["global_scratch_size"] == info["profile_scratch_size"] == 0
        assert info["block"] == 32 * info["num_warps"] and cfg.block_c * cfg.block_s <= TACTICS[tactic][0]
        seen.add((cfg.block_c, cfg.block_s))
    if max(groups) >= 64:
        assert len(seen) > 1  # the tactics are different kernels (tiny groups fit one tile whatever the budget)


def test_aot_kernel_fp16_and_dynamic_spatial(gk):
    from surgeon_plugins.grownorm_trt import aot_kernel, spatial_size

    assert spatial_size((-1, 8)) == 1 and spatial_size((-1, 8, 3, 4)) == 12 and spatial_size((2, 8, -1, 4)) is None
    _, ptx, cfg, _ = aot_kernel((6, 2), 1e-5, "fp16", (-1, 8, -1, -1), 1, 90)
    assert not cfg.rows and ".f16" in ptx


def test_eps_arrives_as_a_one_element_array():
    """TensorRT's parser passes the node's FLOAT ``eps`` as a 1-D field; the plugin reads it either way."""
    from surgeon_plugins.grownorm_trt import aot_kernel, attr_float

    field = np.array([1e-5], dtype=np.float32)  # what tensorrt.plugin hands over for an NDArray[float32] attribute
    assert attr_float(field) == float(np.float32(1e-5)) and attr_float(1e-6) == 1e-6
    with pytest.raises(ValueError, match="one value"):
        attr_float(np.array([1.0, 2.0]))
    from_array = aot_kernel((6, 2), field, "fp32", (-1, 8, 3, 3), 1, 80)[1]
    from_float = aot_kernel((6, 2), float(np.float32(1e-5)), "fp32", (-1, 8, 3, 3), 1, 80)[1]
    assert from_array == from_float


def test_axis_is_a_v1_attribute_with_launch_dims_for_both_layouts(gk):
    """axis -1: the kernel's [N, C] layout over N = prod(all dims but the last), S = 1."""
    from surgeon_plugins.grownorm_trt import aot_kernel, check_axis, launch_dims, spatial_size

    assert launch_dims([2, 8, 3, 4]) == (2, 12) and launch_dims([2, 8]) == (2, 1)
    assert launch_dims([2, 5, 3, 8], -1) == (30, 1) and launch_dims([7, 8], np.array([-1], np.int32)) == (7, 1)
    assert spatial_size((-1, 5, -1, 8), -1) == 1 and spatial_size((-1, 8, -1, 4)) is None
    assert check_axis(np.array([1], np.int32)) == 1 and check_axis(-1) == -1
    for bad in (0, 2, np.array([1, -1]), 1.5):
        with pytest.raises(ValueError, match="axis must be 1 or -1"):
            check_axis(bad)
    for tactic in (1, 4):
        _, ptx, cfg, info = aot_kernel((48, 16), 1e-6, "fp32", (-1, 5, 7, 64), tactic, 80, np.array([-1], np.int32))
        assert cfg.rows and info["rows"] and "cdiv(N, BLOCK_S)" in info["grid_formula"]
        _, _, cfg1, _ = aot_kernel((48, 16), 1e-6, "fp32", (-1, 64, 7, 5), tactic, 80)
        assert not cfg1.rows  # the same groups over dim 1 of a 4-D input: the [N, C, S] layout


@pytest.mark.parametrize("shape, groups", [((2, 3, 12), (8, 4)), ((2, 2, 3, 300), (200, 100))], ids=["NTC", "NHWC"])
@pytest.mark.parametrize("tactic", [1, 4])
def test_trt_kernel_runs_axis_minus_one_with_its_launch(gk, device, shape, groups, tactic):
    """The TensorRT-facing kernel launched as aot_impl describes for an axis -1 input (N and S from
    launch_dims, the grid from the tile configuration), against the float64 composite."""
    from surgeon.grow.grownorm import grow_norm
    from surgeon_plugins.grownorm_trt import aot_kernel, launch_dims

    name, _, _, info = aot_kernel(groups, 1e-6, "fp32", (-1,) + shape[1:], tactic, 90, -1)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(shape, generator=gen).to(device)
    gamma = (torch.rand(shape[-1], generator=gen) + 0.5).to(device)
    y = torch.full_like(x, float("nan"))
    n, s = launch_dims(list(shape), -1)
    tensors = {"X": x, "GAMMA": gamma, "Y": y, "N": n, "S": s}
    getattr(gk, name)[info["grid"](n, s)](
        *(tensors[p] for p in info["params"]),
        GROUPS=groups, C=sum(groups), EPS=1e-6, HAS_GAMMA=True, ROWS=info["rows"],
        BLOCK_C=info["block_c"], BLOCK_S=info["block_s"], num_warps=info["num_warps"],
    )
    want = grow_norm(x.cpu().double(), groups, gamma.cpu().double(), 1e-6, axis=-1)
    err = (y.cpu().double() - want).abs().max().item()
    assert err <= 1e-5 * want.abs().max().item(), err


def test_with_explicit_axis_writes_the_default_for_the_plugin_parser():
    """The parser passes only the attributes a node has, and tensorrt.plugin has no defaults: the
    copy parsed for the plugin carries axis=1 where the file omits it (the file is left alone)."""
    import onnx

    from surgeon_plugins.grownorm_trt import with_explicit_axis

    nodes = [onnx.helper.make_node("GrowNorm", ["x", "g"], ["y"], domain="surgeon", groups=[2, 2], eps=1e-6),
             onnx.helper.make_node("GrowNorm", ["y", "g"], ["z"], domain="surgeon", groups=[4], eps=1e-6, axis=-1),
             onnx.helper.make_node("Relu", ["z"], ["w"])]
    model = onnx.helper.make_model(onnx.helper.make_graph(nodes, "g", [], []))
    out = with_explicit_axis(model)
    axes = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}.get("axis") for n in out.graph.node]
    assert axes == [1, -1, None]
    assert not any(a.name == "axis" for a in model.graph.node[0].attribute)  # the input is not modified


def test_builder_says_why_the_plugin_cannot_be_used():
    old = Toolkit("tensorrt", types.SimpleNamespace(__version__="10.3.0"), ahead_of_time=False)
    assert plugin_status(old) == (False, "TensorRT 10.3.0 cannot embed Python plugins ahead of time (10.9 or later is needed)")
    rtx = Toolkit("tensorrt-rtx", types.SimpleNamespace(__version__="1.7"), ahead_of_time=True)
    assert plugin_status(rtx) == (False, "TensorRT-RTX has no plugin layers")


# -- full TensorRT on a GPU -----------------------------------------------------------------------

_RUN_ENGINE = """
import json, sys
import numpy as np, tensorrt as trt, torch
engine_path, x_path = sys.argv[1], sys.argv[2]
logger = trt.Logger(trt.Logger.ERROR)
engine = trt.Runtime(logger).deserialize_cuda_engine(open(engine_path, "rb").read())
assert engine is not None, "engine did not deserialize"
ctx = engine.create_execution_context()
x = torch.from_numpy(np.load(x_path)).cuda().contiguous()
ctx.set_input_shape("images", tuple(x.shape))
y = torch.empty(tuple(ctx.get_tensor_shape("logits")), device="cuda", dtype=torch.float32)
ctx.set_tensor_address("images", x.data_ptr())
ctx.set_tensor_address("logits", y.data_ptr())
stream = torch.cuda.Stream()
assert ctx.execute_async_v3(stream.cuda_stream)
stream.synchronize()
np.save(x_path + ".out.npy", y.cpu().numpy())
print(json.dumps({"plugin_modules": sorted(m for m in sys.modules if m.startswith(("surgeon", "tensorrt.plugin")))}))
"""


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engine_with_the_plugin_runs_without_python_plugin_code(tmp_path, precision):
    trt = pytest.importorskip("tensorrt")
    pytest.importorskip("tensorrt.plugin")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    import onnxruntime as ort

    from surgeon.export.onnx_export import export_checkpoint
    from surgeon.grow.recipe import GrowStep
    from surgeon.trt.build import build_engine
    from tests.export.test_onnx_export import _grown_checkpoint

    ckpt = _grown_checkpoint(tmp_path / "g.pt", [GrowStep("wide", "classifier.0", 32), GrowStep("wide", "features.8", 8)])
    onnx_path = export_checkpoint(ckpt, tmp_path / "m.onnx", precision=precision).path
    report = build_engine(onnx_path, builder="tensorrt", plugin="on")
    assert report.grownorm_impl == "plugin" and report.plugin_layers == report.grownorm_nodes == 2
    assert trt.get_plugin_registry().get_creator("GrowNorm", "1", "surgeon") is not None

    x = np.random.default_rng(0).normal(size=(5, 3, 32, 32)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    proc = subprocess.run([sys.executable, "-c", _RUN_ENGINE, report.engine, str(tmp_path / "x.npy")],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["plugin_modules"] == []  # self-contained engine
    got = np.load(tmp_path / "x.npy.out.npy")
    want = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
    tolerance = 1e-4 if precision == "fp32" else 1e-2
    assert np.abs(got - want).max() <= tolerance * np.abs(want).max()
