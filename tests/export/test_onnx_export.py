"""grown.pt → ONNX: the GrowNorm node + local function contract, metadata, parity, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx.inliner
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx.reference import ReferenceEvaluator

from surgeon.checkpoint import Checkpoint, save_checkpoint
from surgeon.cli import cli
from surgeon.export.onnx_export import export_checkpoint
from surgeon.grow.analysis import trace
from surgeon.grow.grownorm import GrowNorm
from surgeon.grow.ops import GrowthState, apply_steps
from surgeon.grow.recipe import GrowStep, HeadStep
from surgeon.zoo import DIGITS_PREPROCESSING, build_architecture


def _grown_checkpoint(path: Path, steps, arch: str = "surgeon:digitnet", size: int = 32) -> Path:
    torch.manual_seed(0)
    gm = trace(build_architecture(arch))
    all_steps = [HeadStep(classes=4), *steps]
    apply_steps(gm, all_steps, GrowthState(size))
    with torch.no_grad():  # non-trivial scales and BN statistics, as after training
        for m in gm.modules():
            if isinstance(m, GrowNorm):
                m.gamma.uniform_(0.5, 3.0)
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    pre = DIGITS_PREPROCESSING if size == 32 else DIGITS_PREPROCESSING.__class__(input_size=size, resize=size)
    save_checkpoint(path, Checkpoint(model=arch, weights="none", recipe=all_steps, classes=["a", "b", "c", "d"],
                                     preprocessing=pre, state_dict=gm.state_dict()))
    return path


@pytest.fixture(scope="module")
def wwa(tmp_path_factory) -> tuple[Path, onnx.ModelProto]:
    d = tmp_path_factory.mktemp("wwa")
    ckpt = _grown_checkpoint(d / "grown.pt", [GrowStep("wide", "classifier.0", 32), GrowStep("wide", "classifier.3", 16),
                                              GrowStep("wide", "features.8", 8)])
    result = export_checkpoint(ckpt, d / "model.onnx")
    return ckpt, onnx.load(result.path)


def test_each_grownorm_is_one_node_sharing_one_function(wwa):
    _, model = wwa
    nodes = [n for n in model.graph.node if n.op_type == "GrowNorm"]
    assert len(nodes) == 3 and all(n.domain == "surgeon" for n in nodes)
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nodes]
    assert sorted(tuple(a["groups"]) for a in attrs) == sorted([(64, 8), (128, 32), (128, 16)])
    for a in attrs:
        assert a["plugin_namespace"] == b"surgeon" and a["plugin_version"] == b"1"
        assert a["eps"] == pytest.approx(1e-6)
    assert [(f.domain, f.name) for f in model.functions] == [("surgeon", "GrowNorm")]
    inner = [n.name for n in model.functions[0].node]
    assert len(set(inner)) == len(inner) and not set(inner) & {n.name for n in model.graph.node}
    assert {o.domain: o.version for o in model.opset_import}["surgeon"] == 1
    onnx.checker.check_model(model)


def test_names_dynamic_batch_and_metadata(wwa):
    _, model = wwa
    assert [i.name for i in model.graph.input] == ["images"]
    assert [o.name for o in model.graph.output] == ["logits"]
    batch = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.HasField("dim_value")
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["surgeon.classes"]) == ["a", "b", "c", "d"]
    assert json.loads(meta["surgeon.preprocessing"])["input_size"] == 32
    assert [s["op"] for s in json.loads(meta["surgeon.recipe"])] == ["head", "grow", "grow", "grow"]
    assert meta["surgeon_version"]


def test_onnx_runtime_and_reference_evaluator_match_pytorch(wwa):
    import surgeon

    ckpt, model = wwa
    torch_model = surgeon.load(ckpt)
    x = torch.randn(7, 3, 32, 32)
    with torch.no_grad():
        expected = torch_model(x).numpy()
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})[0]
    scale = np.abs(expected).max()
    assert np.abs(got - expected).max() / scale < 1e-5
    # onnx 1.23's evaluator cannot run a function with an optional attribute (GrowNorm's axis): inline it first
    ref = ReferenceEvaluator(onnx.inliner.inline_local_functions(model)).run(None, {"images": x.numpy()})[0]
    assert np.abs(ref - got).max() / scale < 1e-5


def test_function_alone_matches_grow_norm_for_several_ranks():
    from surgeon.export.grownorm_op import DOMAIN, grownorm_function
    from surgeon.grow.grownorm import grow_norm

    for shape, groups in [((3, 7), (3, 4)), ((2, 6, 4, 5), (1, 2, 3)), ((2, 5, 3), (5,)), ((4, 9), (8, 1))]:
        node = onnx.helper.make_node("GrowNorm", ["X", "g"], ["Y"], domain=DOMAIN, groups=list(groups), eps=1e-6,
                                     plugin_namespace="surgeon", plugin_version="1")
        graph = onnx.helper.make_graph([node], "t", [onnx.helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, shape),
                                                     onnx.helper.make_tensor_value_info("g", onnx.TensorProto.FLOAT, [shape[1]])],
                                       [onnx.helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, None)])
        model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18), onnx.helper.make_opsetid(DOMAIN, 1)],
                                       functions=[grownorm_function()])
        x = torch.rand(shape) * (torch.rand(shape) > 0.3)
        x[0, : groups[0]] = 0  # an all-zero group
        g = torch.rand(shape[1]) + 0.5
        want = grow_norm(x, groups, g, 1e-6).numpy()
        got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"X": x.numpy(), "g": g.numpy()})[0]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch, size, step", [
    ("torchvision:resnet18", 64, GrowStep("wide", "layer4.1.conv1", 16)),
    ("torchvision:resnet18", 64, GrowStep("deep", "layer3.1.conv1", 256)),
    ("torchvision:mobilenet_v3_small", 64, GrowStep("wide", "classifier.0", 32)),
])
def test_torchvision_architectures_export_with_parity(tmp_path, arch, size, step):
    ckpt = _grown_checkpoint(tmp_path / "grown.pt", [step], arch=arch, size=size)
    result = export_checkpoint(ckpt, tmp_path / "m.onnx")
    assert result.grownorm_nodes == 1
    assert all(c.ok and c.rel_err < 1e-4 for c in result.verifications)
    assert {c.batch for c in result.verifications} == {1, 5}


def test_cli_export_verify_and_report(tmp_path, wwa):
    ckpt, _ = wwa
    out, report = tmp_path / "m.onnx", tmp_path / "r.json"
    res = CliRunner().invoke(cli, ["export", str(ckpt), "-o", str(out), "--report", str(report)])
    assert res.exit_code == 0, res.output
    assert "3 GrowNorm node(s)" in res.output
    data = json.loads(report.read_text())
    assert data["grownorm_nodes"] == 3 and all(v["ok"] for v in data["verification"])
    res = CliRunner().invoke(cli, ["verify", str(out), "--against", str(ckpt)])
    assert res.exit_code == 0 and "matches" in res.output


def test_verify_catches_a_tampered_model(tmp_path, wwa):
    ckpt, model = wwa
    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    init = next(i for i in bad.graph.initializer if len(onnx.numpy_helper.to_array(i).shape) == 2)
    arr = onnx.numpy_helper.to_array(init).copy()
    arr *= 1.5
    init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    path = tmp_path / "bad.onnx"
    onnx.save(bad, path)
    res = CliRunner().invoke(cli, ["verify", str(path), "--against", str(ckpt)])
    assert res.exit_code == 1 and "differs from PyTorch" in res.output


def test_failed_verification_writes_nothing(tmp_path, wwa):
    ckpt, _ = wwa
    from surgeon.errors import SurgeonError

    with pytest.raises(SurgeonError, match="export: ONNX Runtime differs"):
        export_checkpoint(ckpt, tmp_path / "m.onnx", tolerance=0.0)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, message", [
    (["README.md"], "corrupt or not a torch checkpoint"),
    (["missing.pt"], "does not exist"),
])
def test_bad_export_inputs(args, message):
    res = CliRunner().invoke(cli, ["export", *args])
    assert res.exit_code == 1 and message in res.output and len(res.output.strip().splitlines()) == 1


def test_unsupported_opset_and_unwritable_output(tmp_path, wwa):
    ckpt, _ = wwa
    res = CliRunner().invoke(cli, ["export", str(ckpt), "--opset", "11", "-o", str(tmp_path / "m.onnx")])
    assert res.exit_code == 1 and "--opset 11 is not supported" in res.output
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = CliRunner().invoke(cli, ["export", str(ckpt), "-o", str(blocker / "m.onnx")])
    assert res.exit_code == 1 and "cannot write" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_passes_remove_the_growth_overhead(tmp_path):
    """fold-gamma leaves every GrowNorm with γ = 1 and merge-parallel removes the branches: the
    folded file has the op counts of a plain network of the same widths plus the GrowNorm nodes."""
    steps = [GrowStep("wide", "features.8", 8), GrowStep("wide", "classifier.3", 16)]
    ckpt = _grown_checkpoint(tmp_path / "grown.pt", steps)
    folded = export_checkpoint(ckpt, tmp_path / "folded.onnx")
    unfolded = export_checkpoint(ckpt, tmp_path / "unfolded.onnx", fold=False)
    assert unfolded.ops_after["Conv"] == 4 and unfolded.ops_after["Gemm"] == 4
    assert unfolded.ops_after.get("Slice", 0) == 2 and unfolded.ops_after.get("Concat", 0) >= 2
    # Plain DigitNet: 3 Conv, 3 Gemm, no Concat/Slice; one BatchNorm survives where the split one was merged.
    assert folded.ops_after["Conv"] == 3 and folded.ops_after["Gemm"] == 3
    assert "Concat" not in folded.ops_after and "Slice" not in folded.ops_after
    assert folded.grownorm_nodes == unfolded.grownorm_nodes == 2
    model = onnx.load(folded.path)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in (n for n in model.graph.node if n.op_type == "GrowNorm"):
        assert np.all(inits[node.input[1]] == 1)
    fold = next(p for p in folded.passes if p["pass"] == "fold-gamma")
    assert len(fold["changed"]) == 2 and not fold["skipped"]
    assert {c.stage for c in folded.verifications} == {"export", "cleanup", "fold-gamma", "merge-parallel"}
    # Same function, same numbers.
    x = torch.randn(3, 3, 32, 32).numpy()
    run = lambda p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]  # noqa: E731
    np.testing.assert_allclose(run(folded.path), run(unfolded.path), rtol=1e-4, atol=1e-5)


def test_fold_keeps_negative_gamma_before_relu_and_says_so(tmp_path):
    # fc6 widened: GrowNorm → Dropout → fc7 (no ReLU in between: everything folds);
    # then make one γ negative in a conv-level norm that reaches the consumer through MaxPool.
    ckpt_path = _grown_checkpoint(tmp_path / "grown.pt", [GrowStep("wide", "features.8", 8)])
    raw = torch.load(ckpt_path, weights_only=True)
    raw["state_dict"]["features_8_norm.gamma"][:3] = -1.0
    torch.save(raw, ckpt_path)
    result = export_checkpoint(ckpt_path, tmp_path / "m.onnx")
    fold = next(p for p in result.passes if p["pass"] == "fold-gamma")
    assert "69/72 channels" in fold["changed"][0]["done"]
    assert any("3 channel(s) with γ ≤ 0" in s["reason"] for s in fold["skipped"])


def test_fp16_keeps_grownorm_in_fp32_and_io_in_fp32(tmp_path, wwa):
    ckpt, _ = wwa
    result = export_checkpoint(ckpt, tmp_path / "h.onnx", precision="fp16")
    model = onnx.load(result.path)
    f32, f16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    assert model.graph.input[0].type.tensor_type.elem_type == f32
    assert model.graph.output[0].type.tensor_type.elem_type == f32
    inits = {i.name: i.data_type for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    for node in (n for n in model.graph.node if n.op_type == "GrowNorm"):
        assert inits[node.input[1]] == f32                       # γ stays fp32
        cast = producers[node.input[0]]
        assert cast.op_type == "Cast" and cast.attribute[0].i == f32   # input cast up to fp32
    weights = [t for name, t in inits.items() if "weight" in name]
    assert weights and all(t == f16 for t in weights)
    assert {p.key: p.value for p in model.metadata_props}["surgeon.precision"] == "fp16"
    fp16_checks = [c for c in result.verifications if c.stage == "fp16"]
    assert fp16_checks and all(c.rel_err < 1e-2 for c in fp16_checks)
    assert max(c.rel_err for c in fp16_checks) > 1e-6  # really fp16 arithmetic, not a copy of fp32


def test_verification_on_real_images(tmp_path, wwa):
    from PIL import Image

    ckpt, _ = wwa
    folder = tmp_path / "imgs" / "x"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (40, 30), (60 * i, 100, 200 - 50 * i)).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    result = export_checkpoint(ckpt, tmp_path / "m.onnx", calib=str(tmp_path / "imgs"), fold=False)
    real = [c for c in result.verifications if "images from" in c.inputs]
    assert real and all(c.batch == 3 for c in real)


def test_batch_range_is_recorded_and_respected(tmp_path, wwa):
    ckpt, _ = wwa
    out = tmp_path / "m.onnx"
    res = CliRunner().invoke(cli, ["export", str(ckpt), "-o", str(out), "--batch", "2:4:8", "--precision", "fp16"])
    assert res.exit_code == 0, res.output
    model = onnx.load(out)
    assert {p.key: p.value for p in model.metadata_props}["surgeon.batch"] == "2:4:8"
    assert "batch   2" in res.output and "batch   5" in res.output and "batch   1 " not in res.output
    res = CliRunner().invoke(cli, ["verify", str(out), "--against", str(ckpt)])  # fp16 file: fp16 tolerance
    assert res.exit_code == 0, res.output
    assert "tolerance 1e-02" in res.output
    for bad in ("8:4:2", "0:1:2", "a:b", "1:2"):
        res = CliRunner().invoke(cli, ["export", str(ckpt), "-o", str(tmp_path / "x.onnx"), "--batch", bad])
        assert res.exit_code == 1 and "--batch" in res.output
    assert not (tmp_path / "x.onnx").exists()


def test_large_model_path_uses_external_data(tmp_path, monkeypatch, wwa):
    """Models over protobuf's 2 GB limit are written with external data (their tensors in
    ``<name>.data``), and `surgeon verify` reads them back. Forced here with a tiny threshold."""
    from surgeon.export import lean

    ckpt, _ = wwa
    monkeypatch.setattr(lean, "EXTERNAL_DATA_THRESHOLD", 10_000)
    result = export_checkpoint(ckpt, tmp_path / "big.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    assert (tmp_path / "big.onnx").stat().st_size < 100_000 < (tmp_path / "big.onnx.data").stat().st_size
    fold = next(p for p in result.passes if p["pass"] == "fold-gamma")
    assert len(fold["changed"]) == 3  # shapes were inferred on the graph without its weights: the flatten path folded
    header = onnx.load(str(tmp_path / "big.onnx"), load_external_data=False)
    external = [i for i in header.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL]
    assert {i.name for i in external} == set(result.model.weights) and len(external) > 3
    res = CliRunner().invoke(cli, ["verify", str(tmp_path / "big.onnx"), "--against", str(ckpt)])
    assert res.exit_code == 0, res.output
    x = torch.randn(2, 3, 32, 32).numpy()
    sess = ort.InferenceSession(str(tmp_path / "big.onnx"), providers=["CPUExecutionProvider"])
    import surgeon

    with torch.no_grad():
        want = surgeon.load(ckpt)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(sess.run(None, {"images": x})[0], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_a_model_random_at_inference_is_refused():
    """Randomness in eval mode (here dropout applied regardless of eval()) cannot be verified: the
    reference says so instead of reporting a numeric mismatch."""
    from surgeon.errors import SurgeonError
    from surgeon.export.verify import torch_reference

    class AlwaysDrops(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(3 * 32 * 32, 4)

        def forward(self, x):
            return self.fc(torch.nn.functional.dropout(x.flatten(1), 0.5, training=True))

    with pytest.raises(SurgeonError, match="different logits for the same input twice in eval mode"):
        torch_reference(AlwaysDrops(), DIGITS_PREPROCESSING)
    torch_reference(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 4)), DIGITS_PREPROCESSING)
