"""Every exported model parses and builds with TensorRT-RTX on the CPU (ahead of time), through
surgeon's own builder.

TensorRT-RTX has no plugin layers, so these builds exercise the ``surgeon.GrowNorm`` local function
— the fallback TensorRT's parser uses when the plugin is not registered. A build proves the ops,
shapes and types are accepted; running the engine needs an RTX-class GPU (not available here).
"""

from __future__ import annotations

import json

import onnx
import pytest

from surgeon.export.onnx_export import BatchRange, export_checkpoint
from surgeon.grow.recipe import GrowStep
from surgeon.trt.build import build_engine, engine_sidecar
from tests.export.test_onnx_export import _grown_checkpoint

pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu12 is not installed")

CASES = [
    ("surgeon:digitnet", 32, [GrowStep("wide", "features.8", 8), GrowStep("wide", "classifier.0", 32), GrowStep("wide", "classifier.3", 16)]),
    ("surgeon:digitnet", 32, [GrowStep("deep", "classifier.3", 64)]),
    ("torchvision:resnet18", 64, [GrowStep("wide", "layer4.1.conv1", 16)]),
    ("torchvision:mobilenet_v3_small", 64, [GrowStep("wide", "classifier.0", 32)]),
    ("torchvision:alexnet", 96, [GrowStep("wide", "classifier.4", 64)]),
    # SiLU, squeeze-excitation and stochastic depth (which must not survive into the deployed graph)
    ("torchvision:efficientnet_b0", 64, [GrowStep("wide", "features.1.0.block.2.0", 8)]),
]
RANDOM_OPS = {"RandomUniform", "RandomUniformLike", "RandomNormal", "RandomNormalLike", "Bernoulli", "Multinomial"}


@pytest.mark.slow
@pytest.mark.parametrize("arch, size, steps", CASES, ids=[f"{c[0]}-{c[2][0].kind}-{c[2][0].layer}" for c in CASES])
@pytest.mark.parametrize("fold", [True, False], ids=["folded", "no-fold"])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_exported_model_builds_with_tensorrt_rtx(tmp_path, arch, size, steps, fold, precision):
    ckpt = _grown_checkpoint(tmp_path / "grown.pt", steps, arch=arch, size=size)
    result = export_checkpoint(ckpt, tmp_path / "m.onnx", fold=fold, precision=precision, batch=BatchRange(1, 8, 32))
    graph = onnx.load(result.path).graph
    nodes = sum(n.op_type == "GrowNorm" for n in graph.node)
    assert nodes >= 1 and not RANDOM_OPS & {n.op_type for n in graph.node}

    report = build_engine(result.path, builder="tensorrt-rtx")

    engine = tmp_path / "m.engine"
    assert report.engine == str(engine) and engine.stat().st_size == report.engine_bytes > 10_000
    assert report.ahead_of_time and "TensorRT-RTX" in report.builder
    assert report.precision == precision and report.batch == "1:8:32" and report.input_shape == [-1, 3, size, size]
    assert report.grownorm_nodes == nodes and report.grownorm_impl == "onnx function" and report.plugin_layers == 0
    sidecar = json.loads(engine_sidecar(engine).read_text())
    assert json.loads(sidecar["metadata"]["surgeon.classes"]) == ["a", "b", "c", "d"]
    assert sidecar["build"]["engine_bytes"] == report.engine_bytes


@pytest.mark.slow
@pytest.mark.parametrize("fold", [True, False], ids=["folded", "no-fold"])
def test_axis_minus_one_token_model_builds_with_tensorrt_rtx(tmp_path, fold):
    """A GrowNorm(axis=-1) on [N, T, C] tokens (no growth step makes one yet): the shared function,
    reading axis through an attribute reference, parses and builds (TensorRT-RTX: no plugin layers)."""
    from surgeon.export.onnx_export import save_onnx, set_metadata
    from surgeon.export.passes import default_passes
    from tests.export.test_grownorm_axis import _token_model

    _, lean = _token_model("linear")
    if fold:
        lean, _ = default_passes(True).run(lean)
    set_metadata(lean.proto, {"surgeon.batch": "1:4:8", "surgeon.precision": "fp32"})
    path = save_onnx(lean, tmp_path / "tokens.onnx")
    nodes = [n for n in onnx.load(path).graph.node if n.op_type == "GrowNorm"]
    assert len(nodes) == 1 and any(a.name == "axis" and a.i == -1 for a in nodes[0].attribute)

    report = build_engine(path, builder="tensorrt-rtx")

    assert (tmp_path / "tokens.engine").stat().st_size == report.engine_bytes > 10_000
    assert report.grownorm_nodes == 1 and report.grownorm_impl == "onnx function" and report.plugin_layers == 0
    assert report.batch == "1:4:8" and report.input_shape == [-1, 3, 16, 16]
