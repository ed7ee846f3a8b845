"""Every exported model parses and builds with TensorRT-RTX on the CPU (ahead of time).

TensorRT-RTX has no plugin layers, so these builds exercise the ``surgeon.GrowNorm`` local function
— the fallback TensorRT's parser uses when the plugin is not registered. A build proves the ops,
shapes and types are accepted; running the engine needs an RTX-class GPU (not available here).
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from surgeon.export.onnx_export import export_checkpoint
from surgeon.grow.recipe import GrowStep

from tests.export.test_onnx_export import _grown_checkpoint

trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu12 is not installed")

_LOGGER = trt.Logger(trt.Logger.ERROR)  # one logger per process: TensorRT reuses the first one


def build_engine(path: Path, size: int, batch: tuple[int, int, int] = (1, 8, 32)) -> bytes:
    builder = trt.Builder(_LOGGER)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, _LOGGER)
    if not parser.parse(path.read_bytes()):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        pytest.fail(f"TensorRT-RTX cannot parse {path.name}: {errors}")
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    lo, opt, hi = ((b, 3, size, size) for b in batch)
    profile.set_shape("images", lo, opt, hi)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    assert plan is not None, f"TensorRT-RTX could not build {path.name}"
    return bytes(plan)


CASES = [
    ("surgeon:digitnet", 32, [GrowStep("wide", "features.8", 8), GrowStep("wide", "classifier.0", 32), GrowStep("wide", "classifier.3", 16)]),
    ("surgeon:digitnet", 32, [GrowStep("deep", "classifier.3", 64)]),
    ("torchvision:resnet18", 64, [GrowStep("wide", "layer4.1.conv1", 16)]),
    ("torchvision:mobilenet_v3_small", 64, [GrowStep("wide", "classifier.0", 32)]),
]


@pytest.mark.slow
@pytest.mark.parametrize("arch, size, steps", CASES, ids=[f"{c[0]}-{c[2][0].kind}-{c[2][0].layer}" for c in CASES])
@pytest.mark.parametrize("fold", [True, False], ids=["folded", "no-fold"])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_exported_model_builds_with_tensorrt_rtx(tmp_path, arch, size, steps, fold, precision):
    ckpt = _grown_checkpoint(tmp_path / "grown.pt", steps, arch=arch, size=size)
    result = export_checkpoint(ckpt, tmp_path / "m.onnx", fold=fold, precision=precision)
    assert any(n.op_type == "GrowNorm" for n in onnx.load(result.path).graph.node)
    plan = build_engine(result.path, size)
    assert len(plan) > 10_000
