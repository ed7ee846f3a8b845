"""INT8 quantization (surgeon quantize, export --precision int8): Q/DQ placement, GrowNorm in float,
agreement on held-out images, the γ-derived GrowNorm ranges, refusals that write nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper
from PIL import Image

from surgeon.checkpoint import Checkpoint, read_checkpoint, save_checkpoint
from surgeon.cli import cli
from surgeon.errors import SurgeonError
from surgeon.export.onnx_export import export_checkpoint
from surgeon.export.quantize import QuantizeOptions, quantize_file
from surgeon.grow.analysis import trace
from surgeon.grow.ops import GrowthState, apply_steps
from surgeon.grow.recipe import GrowStep
from surgeon.onnxrt import open_session
from surgeon.zoo import load_base
from tests.conftest import DIGITNET


def write_digits(folder: Path, count: int = 200) -> Path:
    """scikit-learn's 8x8 digits 0-4 (what the shipped DigitNet was trained on) as PNGs in class folders."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = np.flatnonzero(digits.target < 5)[:count]
    for i in keep:
        (folder / str(digits.target[i])).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(digits.images[i] * 255 / 16).astype(np.uint8)).save(folder / str(digits.target[i]) / f"{i}.png")
    return folder


def grown_digitnet(path: Path) -> Path:
    """The shipped (pretrained) DigitNet with fc7 widened by 64 net2net units and GrowNorm after it."""
    ckpt = read_checkpoint(DIGITNET)
    torch.manual_seed(0)
    gm = trace(load_base("surgeon:digitnet", str(DIGITNET)).module.eval())
    steps = [GrowStep("wide", "classifier.3", 64, init="net2net")]
    apply_steps(gm, steps, GrowthState(ckpt.preprocessing.input_size))
    save_checkpoint(path, Checkpoint(model=ckpt.model, weights="none", recipe=steps, classes=ckpt.classes,
                                     preprocessing=ckpt.preprocessing, state_dict=gm.state_dict()))
    return path


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    return write_digits(tmp_path_factory.mktemp("digits") / "imgs")


@pytest.fixture(scope="module")
def grown(tmp_path_factory) -> tuple[Path, Path]:
    """(grown.pt, its folded fp32 export)."""
    d = tmp_path_factory.mktemp("grown")
    ckpt = grown_digitnet(d / "grown.pt")
    return ckpt, export_checkpoint(ckpt, d / "model.onnx").path


@pytest.fixture(scope="module")
def int8(grown, digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "model.int8.onnx"
    return quantize_file(grown[1], out, QuantizeOptions(str(digits), data=str(digits)))


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def _consumers(model: onnx.ModelProto, tensor: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if tensor in n.input]


def test_digitnet_int8_is_valid_runs_and_agrees(int8, grown, digits):
    model = onnx.load(int8.path)
    onnx.checker.check_model(model)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["surgeon.precision"] == "int8" and json.loads(meta["surgeon.quantization"])["method"] == "minmax"
    # every Conv/Gemm reads an int8 activation and int8 per-channel weights
    producers = _producers(model)
    inits = {t.name: t for t in model.graph.initializer}
    linear = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    assert len(linear) == 6 and sorted(int8.quantized) == sorted(n.name for n in linear)
    for n in linear:
        x, w = producers[n.input[0]], producers[n.input[1]]
        assert x.op_type == w.op_type == "DequantizeLinear"
        assert inits[w.input[0]].data_type == onnx.TensorProto.INT8
        scale = numpy_helper.to_array(inits[w.input[1]])
        assert scale.shape == (inits[w.input[0]].dims[0],)  # one scale per output channel
        zero = numpy_helper.to_array(inits[x.input[2]]) if len(x.input) > 2 else np.zeros(1)
        assert not zero.any()  # symmetric activations, as TensorRT needs
        assert len(n.input) < 3 or n.input[2] in inits  # biases stay float (TensorRT rejects int32 DQ)
    # the logits are the last Gemm's own (float) output
    assert producers["logits"].op_type == "Gemm"
    # agreement on held-out images, reported and reproduced here
    assert int8.calibration_images == 100 and int8.held_out.images == 100
    assert int8.held_out.top1 >= 0.99 and int8.held_out.max_abs_err < 0.1 * int8.held_out.scale
    assert int8.held_out.max_abs_err > 1e-5  # really int8 arithmetic, not a copy of fp32
    assert int8.held_out.margin > 5 * int8.held_out.max_abs_err  # why nothing flips: a trained model's classes stand apart
    assert int8.accuracy["images"] == 200 and int8.accuracy["int8"] >= int8.accuracy["fp32"] - 0.02 >= 0.9
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    # the files read back directly, with surgeon's session options (exact int8 on CPUs without VNNI)
    a = open_session(str(grown[1]), ["CPUExecutionProvider"]).run(None, {"images": x})[0]
    b = open_session(str(int8.path), ["CPUExecutionProvider"]).run(None, {"images": x})[0]
    assert b.shape == (4, 5) and 0 < np.abs(a - b).max() < 0.1 * np.abs(a).max()


def test_grownorm_stays_float_between_dq_and_q(int8):
    model = onnx.load(int8.path)
    producers = _producers(model)
    nodes = [n for n in model.graph.node if n.op_type == "GrowNorm"]
    assert len(nodes) == 1 and nodes[0].domain == "surgeon" and model.functions[0].name == "GrowNorm"
    node = nodes[0]
    assert producers[node.input[0]].op_type == "Relu"   # float input (the Relu reads a DequantizeLinear)
    assert producers[producers[node.input[0]].input[0]].op_type == "DequantizeLinear"
    assert [c.op_type for c in _consumers(model, node.output[0])] == ["QuantizeLinear"]  # quantized where the head reads it
    assert [(r.tensor, r.grownorm, r.gamma_bound) for r in int8.ranges] == [(node.output[0], node.name, 1.0)]
    assert 0 < int8.ranges[0].calibrated <= 1.0  # inside the bound: each group is unit-norm (γ folded away)
    old, new = int8.ranges[0].group_max  # fc7's 128 old units, its 64 new ones: one scale serves both
    assert 0 < min(old, new) and max(old, new) == pytest.approx(int8.ranges[0].calibrated, rel=1e-5)


def test_gamma_ranges_set_the_scale_from_gamma(grown, digits, tmp_path, int8):
    result = quantize_file(grown[1], tmp_path / "g.onnx", QuantizeOptions(str(digits), grownorm_ranges="gamma"))
    model, calibrated = onnx.load(result.path), onnx.load(int8.path)

    def scale(m: onnx.ModelProto, tensor: str) -> float:
        q = next(n for n in m.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == tensor)
        return float(numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == q.input[1])))

    tensor = int8.ranges[0].tensor
    assert scale(model, tensor) == pytest.approx(1.0 / 127, rel=1e-6)      # |y| <= max|γ| = 1
    assert scale(calibrated, tensor) == pytest.approx(int8.ranges[0].calibrated / 127, rel=1e-4)
    # each run reports the other choice on the same held-out images
    assert result.alternative.top1 == int8.held_out.top1 and result.held_out.top1 == int8.alternative.top1
    assert result.alternative.mean_abs_err == pytest.approx(int8.held_out.mean_abs_err)


def test_ort_cpu_target_has_uint8_activations_and_gamma_ranges_from_zero(grown, digits, int8, tmp_path):
    result = quantize_file(grown[1], tmp_path / "cpu.onnx", QuantizeOptions(str(digits), target="ort-cpu",
                                                                            grownorm_ranges="gamma"))
    model = onnx.load(result.path)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    quants = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert quants and all(inits[n.input[2]].dtype == np.uint8 for n in quants)
    # GrowNorm reads a Relu and γ = 1: its output lies in [0, 1], all 256 levels of uint8
    q = next(n for n in quants if n.input[0] == int8.ranges[0].tensor)
    assert float(inits[q.input[1]]) == pytest.approx(1.0 / 255, rel=1e-6) and int(inits[q.input[2]]) == 0
    assert result.target == "ort-cpu" and result.held_out.top1 >= 0.99
    assert json.loads({p.key: p.value for p in model.metadata_props}["surgeon.quantization"])["target"] == "ort-cpu"


def test_excluded_layers_stay_float(grown, digits, tmp_path):
    out = tmp_path / "ex.onnx"
    result = quantize_file(grown[1], out, QuantizeOptions(str(digits), exclude=("classifier.0", "node_Conv_51")))
    model = onnx.load(out)
    producers = _producers(model)
    excluded = [n for n in model.graph.node if n.name in result.excluded]
    assert len(excluded) == 2 and "node_Conv_51" in result.excluded
    for n in excluded:
        assert all(producers.get(i) is None or producers[i].op_type != "DequantizeLinear" for i in n.input)
    assert len(result.quantized) == 4 and not set(result.quantized) & set(result.excluded)
    with pytest.raises(SurgeonError, match=r"--exclude nope: no Conv/Gemm/MatMul node .*node_Conv_51"):
        quantize_file(grown[1], tmp_path / "x.onnx", QuantizeOptions(str(digits), exclude=("nope",)))
    assert not (tmp_path / "x.onnx").exists()


def _fragile(source: Path, out: Path) -> Path:
    """A model whose classes are separated by much less than int8 rounding: the head's rows differ by
    1e-4 of their size and its bias is 0 (int8 weights cannot tell the classes apart)."""
    model = onnx.load(source)
    gemm = [n for n in model.graph.node if n.op_type == "Gemm"][-1]
    init = next(t for t in model.graph.initializer if t.name == gemm.input[1])
    w = numpy_helper.to_array(init)
    w = w[:1] + 1e-4 * np.abs(w[:1]).mean() * np.random.default_rng(0).standard_normal(w.shape).astype(np.float32)
    init.CopyFrom(numpy_helper.from_array(w.astype(np.float32), init.name))
    bias = next(t for t in model.graph.initializer if t.name == gemm.input[2])
    bias.CopyFrom(numpy_helper.from_array(np.zeros(w.shape[0], np.float32), bias.name))
    onnx.save(model, out)
    return out


def test_min_agreement_refusal_names_layers_and_writes_nothing(grown, digits, tmp_path):
    fragile = _fragile(grown[1], tmp_path / "fragile.onnx")
    out = tmp_path / "f.int8.onnx"
    with pytest.raises(SurgeonError) as err:
        quantize_file(fragile, out, QuantizeOptions(str(digits)))
    message = str(err.value)
    assert "\n" not in message and not out.exists() and not list(tmp_path.glob(".f.int8.onnx*"))
    assert "below --min-agreement 0.99" in message and "nothing was written" in message
    # --force writes it, with the same ranking: every layer quantized alone, the worst agreement first
    forced = quantize_file(fragile, out, QuantizeOptions(str(digits), force=True))
    ranking = forced.sensitivity
    assert out.exists() and forced.below_min_agreement and forced.held_out.top1 < 0.99
    assert len(ranking) == 6 and [r["top1"] for r in ranking] == sorted(r["top1"] for r in ranking)
    assert ranking[0]["layer"] == "node_linear_3" and ranking[0]["top1"] < 0.9  # the head: int8 rows cannot tell classes apart
    worst = [r["layer"] for r in ranking[:3]]
    assert f"the layers whose quantization hurts most: {worst[0]} (alone: agreement" in message
    assert f"keep them in float with --exclude {worst[0]} --exclude {worst[1]} --exclude {worst[2]}" in message
    kept = quantize_file(fragile, tmp_path / "kept.onnx", QuantizeOptions(str(digits), exclude=(worst[0],), force=True))
    assert kept.held_out.top1 > forced.held_out.top1 and worst[0] in kept.excluded


def _static_input(source: Path, out: Path, size: int) -> Path:
    model = onnx.load(source)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[0].dim_value = 1
    dims[2].dim_value = dims[3].dim_value = size
    onnx.save(model, out)
    return out


@pytest.mark.parametrize("case, message", [
    ("missing", r"--calib folder \S+ does not exist"),
    ("empty", r"--calib folder \S+ holds no images"),
    ("one image", r"--calib needs at least 2 images \(one to calibrate, one held out"),
    ("unreadable", r"cannot read image \S+broken\.png"),
    ("static size", r"takes \[1, 3, 64, 64\], but its preprocessing makes images of \[N, 3, 32, 32\]"),
])
def test_bad_calibration_input_is_one_line_and_writes_nothing(grown, digits, tmp_path, case, message):
    calib, model = tmp_path / "calib", grown[1]
    if case != "missing":
        calib.mkdir()
    if case in ("one image", "unreadable"):
        Image.new("RGB", (8, 8), (10, 20, 30)).save(calib / "a.png")
    if case == "unreadable":
        Image.new("RGB", (8, 8)).save(calib / "b.png")
        (calib / "broken.png").write_bytes(b"\x89PNG not really")
    if case == "static size":
        calib, model = digits, _static_input(grown[1], tmp_path / "static.onnx", 64)
    out = tmp_path / "out.onnx"
    with pytest.raises(SurgeonError, match=message) as err:
        quantize_file(model, out, QuantizeOptions(str(calib)))
    assert "\n" not in str(err.value) and not out.exists()


def test_quantizing_twice_or_fp16_is_refused(int8, grown, digits, tmp_path):
    from surgeon.export.onnx_io import set_metadata

    with pytest.raises(SurgeonError, match="is already quantized: quantize the fp32 export"):
        quantize_file(int8.path, tmp_path / "again.onnx", QuantizeOptions(str(digits)))
    fp16 = onnx.load(grown[1])
    set_metadata(fp16, {"surgeon.precision": "fp16"})
    onnx.save(fp16, tmp_path / "fp16.onnx")
    with pytest.raises(SurgeonError, match="is a fp16 model: quantize the fp32 export"):
        quantize_file(tmp_path / "fp16.onnx", tmp_path / "q.onnx", QuantizeOptions(str(digits)))
    assert not (tmp_path / "again.onnx").exists() and not (tmp_path / "q.onnx").exists()


def test_cli_quantize_and_export_precision_int8(grown, digits, tmp_path):
    runner = CliRunner()
    res = runner.invoke(cli, ["quantize", str(grown[1]), "--calib", str(digits), "-o", str(tmp_path / "q.onnx"),
                              "--calib-method", "percentile", "--report", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    assert f"wrote {tmp_path / 'q.onnx'}" in res.output and "held out  100 image(s): top-1 agreement" in res.output
    assert "GrowNorm  ranges calibrated (used)" in res.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["method"] == "percentile" and report["held_out"]["top1"] >= 0.99

    res = runner.invoke(cli, ["quantize", str(grown[1]), "--calib", str(tmp_path / "nothing")])
    assert res.exit_code == 1 and res.output.count("\n") == 1 and "does not exist" in res.output

    res = runner.invoke(cli, ["export", str(grown[0]), "--precision", "int8", "-o", str(tmp_path / "e.onnx")])
    assert res.exit_code == 2 and "--precision int8 needs --calib DIR" in res.output and not (tmp_path / "e.onnx").exists()
    res = runner.invoke(cli, ["export", str(grown[0]), "--exclude", "x", "-o", str(tmp_path / "e.onnx")])
    assert res.exit_code == 2 and "options of --precision int8" in res.output

    res = runner.invoke(cli, ["export", str(grown[0]), "--precision", "int8", "--calib", str(digits), "-o",
                              str(tmp_path / "e.onnx"), "--report", str(tmp_path / "e.json")])
    assert res.exit_code == 0, res.output
    assert "fold-gamma" in res.output and "held out  100 image(s)" in res.output
    exported = json.loads((tmp_path / "e.json").read_text())
    assert exported["quantization"]["held_out"]["top1"] >= 0.99 and exported["ops_after"]["QuantizeLinear"] >= 6
    assert {p.key: p.value for p in onnx.load(tmp_path / "e.onnx").metadata_props}["surgeon.precision"] == "int8"


def test_session_and_predict_run_the_int8_model(int8, digits):
    from surgeon.runtime import Session

    session = Session(int8.path)
    assert session.artifact.precision == "int8" and session.backend == "ort-cpu"
    files = sorted((digits / "3").glob("*.png"))[:4]
    top = session.predict([str(f) for f in files], topk=1)
    assert [p[0].label for p in top].count("3") >= 3
    res = CliRunner().invoke(cli, ["predict", str(int8.path), str(files[0]), "--topk", "2"])
    assert res.exit_code == 0 and res.output.startswith(f"{files[0]}: 3 ")


def test_quantize_runs_without_torch(grown, digits, tmp_path):
    """The deploy install has no PyTorch: `surgeon quantize` must not need it (torch blocked here)."""
    import subprocess
    import sys

    script = ("import sys; sys.modules['torch'] = sys.modules['torchvision'] = None; from surgeon.cli import main; "
              "main(); ")
    out = tmp_path / "nt.onnx"
    res = subprocess.run([sys.executable, "-c", script, "quantize", str(grown[1]), "--calib", str(digits), "-o", str(out)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert out.exists() and "top-1 agreement" in res.stdout


def write_generated_images(folder: Path, count: int, size: int, seed: int = 0) -> Path:
    """Smooth random colour images (low-frequency noise upsampled): image-like statistics, no data set."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        low = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        image = Image.fromarray(low).resize((size, size), Image.BILINEAR)
        noise = rng.integers(-20, 21, (size, size, 3))
        Image.fromarray(np.clip(np.asarray(image, np.int64) + noise, 0, 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
    return folder


@pytest.mark.slow
def test_grown_resnet18_quantizes_with_agreement(tmp_path):
    from tests.grow.helpers import grown_checkpoint, randomize_batchnorms, torchvision_model

    ckpt, _ = grown_checkpoint(tmp_path / "grown.pt", randomize_batchnorms(torchvision_model("resnet18")),
                               "layer4.1.conv1", 64, "random", "torchvision:resnet18", 64)
    fp32 = export_checkpoint(ckpt, tmp_path / "model.onnx").path
    images = write_generated_images(tmp_path / "imgs", 160, 64)
    result = quantize_file(fp32, tmp_path / "model.int8.onnx", QuantizeOptions(str(images), min_agreement=0.95))
    model = onnx.load(result.path)
    onnx.checker.check_model(model)
    convs = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    assert len(result.quantized) == len(convs) == 21  # 20 convs (one merged from the grown pair) + the head
    assert [n.op_type for n in model.graph.node].count("GrowNorm") == 1 and len(result.ranges) == 1
    assert result.held_out.images == 80 and result.held_out.top1 >= 0.95
    assert result.held_out.mean_abs_err < 0.05 * result.held_out.scale
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu12 is not installed")
    from surgeon.trt.build import build_engine

    report = build_engine(result.path, tmp_path / "model.int8.engine", builder="tensorrt-rtx", precision="int8")
    assert report.engine_bytes > 1_000_000 and report.grownorm_nodes == 1


def test_the_python_api_quantizes_a_file_and_an_export(grown, digits, tmp_path):
    """surgeon.quantize / surgeon.QuantizeOptions (torch-free) and export_onnx(precision="int8", quantization=)."""
    import surgeon

    assert surgeon.quantize is quantize_file and surgeon.QuantizeOptions is QuantizeOptions
    opts = surgeon.QuantizeOptions(str(digits), method="percentile")
    from_file = surgeon.quantize(grown[1], tmp_path / "a.int8.onnx", opts)
    exported = surgeon.export_onnx(grown[0], tmp_path / "b.int8.onnx", precision="int8", quantization=opts)
    for path in (from_file.path, exported.path):
        model = onnx.load(path)
        assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in model.graph.node}
    assert from_file.method == "percentile" and from_file.held_out.top1 >= 0.99


def _residual_block(path: Path, projection: bool) -> Path:
    """x -> Conv -> Relu -> Conv -> Add(., shortcut) -> Relu -> Conv: a ResNet basic block and the next
    conv; the shortcut is x itself or, with ``projection``, a 1x1 Conv of x (both Add inputs convs)."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)

    def w(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)

    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1] * 4),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1] * 4)]
    shortcut = "x"
    if projection:
        nodes.append(helper.make_node("Conv", ["x", "wp"], ["p"], name="proj"))
        shortcut = "p"
    nodes += [helper.make_node("Add", ["c2", shortcut], ["a"], name="add"),
              helper.make_node("Relu", ["a"], ["r2"], name="relu2"),
              helper.make_node("Conv", ["r2", "w3"], ["y"], name="conv3")]
    graph = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [w("w1", 4, 4, 3, 3), w("w2", 4, 4, 3, 3), w("wp", 4, 4, 1, 1), w("w3", 3, 4, 1, 1)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.mark.parametrize("projection", [False, True])
def test_residual_add_keeps_the_conv_output_float_and_the_shortcut_quantized(tmp_path, projection):
    """TensorRT's placement at a skip connection: the conv feeding the Add has no Q/DQ on its output
    (it fuses with the Add), the shortcut is dequantized; the numbers stay those of the Q/DQ graph."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from surgeon.export.quantize import _Reader, _quiet, fuse_residual_adds

    x = np.random.default_rng(1).standard_normal((32, 4, 8, 8)).astype(np.float32)
    source = _residual_block(tmp_path / "block.onnx", projection)
    with _quiet():
        quantize_static(str(source), str(tmp_path / "q.onnx"), _Reader("x", x, 16), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=["Conv"], extra_options={"ActivationSymmetric": True})
    model = onnx.load(tmp_path / "q.onnx")

    def run(m: onnx.ModelProto | Path) -> np.ndarray:
        source = m.SerializeToString() if isinstance(m, onnx.ModelProto) else str(m)
        return open_session(source, ["CPUExecutionProvider"]).run(None, {"x": x})[0]

    before = run(model)
    assert fuse_residual_adds(model) == ["add"]
    onnx.checker.check_model(model)
    add = next(n for n in model.graph.node if n.op_type == "Add")
    producers = _producers(model)
    assert add.input[0] == "c2" and producers["c2"].name == "conv2"           # float conv output into the Add
    assert producers[add.input[1]].op_type == "DequantizeLinear"             # the quantized shortcut
    assert _consumers(model, "c2") == [add]
    after, reference = run(model), run(source)
    # one rounding fewer: at least as close to fp32 as the graph it came from (and close to it)
    assert np.abs(after - reference).mean() <= np.abs(before - reference).mean() * 1.05
    np.testing.assert_allclose(after, before, atol=0.1 * np.abs(reference).max())
    assert fuse_residual_adds(model) == []   # idempotent: nothing left to fuse


def test_bench_and_triton_repo_take_the_int8_file(int8, grown, digits, tmp_path):
    """`surgeon bench` times the int8 file against its fp32 export; `export --precision int8
    --triton-repo` writes a repository whose model is the int8 file (config for ONNX Runtime, TensorRT
    asked for INT8) and runs on ONNX Runtime."""
    from google.protobuf import text_format

    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient is not installed")
    res = CliRunner().invoke(cli, ["bench", str(int8.path), "--vs", str(grown[1]), "--batch", "2", "--iters", "3",
                                   "--warmup", "1", "--json", str(tmp_path / "b.json")])
    assert res.exit_code == 0, res.output
    [run] = json.loads((tmp_path / "b.json").read_text())["runs"]
    assert [r["calls"] for r in run["results"]] == [3, 3] and run["ratio"] > 0
    res = CliRunner().invoke(cli, ["export", str(grown[0]), "-o", str(tmp_path / "m.onnx"), "--precision", "int8",
                                   "--calib", str(digits), "--triton-repo", str(tmp_path / "repo"), "--triton-name", "digits"])
    assert res.exit_code == 0, res.output
    served = tmp_path / "repo" / "digits" / "1" / "model.onnx"
    meta = {p.key: p.value for p in onnx.load(served).metadata_props}
    assert meta["surgeon.precision"] == "int8" and "QuantizeLinear" in {n.op_type for n in onnx.load(served).graph.node}
    cfg = text_format.Parse((tmp_path / "repo" / "digits" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert cfg.platform == "onnxruntime_onnx"
    assert cfg.optimization.execution_accelerators.gpu_execution_accelerator[0].parameters["precision_mode"] == "INT8"
    x = np.zeros((2, *cfg.input[0].dims), np.float32)
    assert ort.InferenceSession(str(served)).run(None, {cfg.input[0].name: x})[0].shape == (2, *cfg.output[0].dims)


def _weights_of_quantized_nodes(model: onnx.ModelProto) -> list[np.ndarray]:
    """The int8 weight arrays the Conv/Gemm/MatMul nodes read through a DequantizeLinear."""
    producers, inits = _producers(model), {t.name: t for t in model.graph.initializer}
    return [numpy_helper.to_array(inits[producers[n.input[1]].input[0]]) for n in model.graph.node
            if n.op_type in ("Conv", "Gemm", "MatMul") and n.input[1] in producers
            and producers[n.input[1]].op_type == "DequantizeLinear" and producers[n.input[1]].input[0] in inits]


def test_reduce_range_writes_7_bit_weights_that_still_agree(grown, digits, tmp_path):
    """--reduce-range (ort-cpu): every quantized weight in [-64, 64], so two uint8 x int8 products sum to
    at most 2 * 255 * 64 = 32640 and ONNX Runtime's fast U8S8 kernels cannot saturate their 16-bit sums
    on a CPU without VNNI; recorded in the metadata; still agrees with fp32.
    The default uses the full 8 bits (some weight at ±127: per-channel symmetric scales)."""
    full = quantize_file(grown[1], tmp_path / "full.onnx", QuantizeOptions(str(digits), target="ort-cpu"))
    reduced = quantize_file(grown[1], tmp_path / "r.onnx", QuantizeOptions(str(digits), target="ort-cpu", reduce_range=True))
    full_w, reduced_w = _weights_of_quantized_nodes(onnx.load(full.path)), _weights_of_quantized_nodes(onnx.load(reduced.path))
    assert len(full_w) == len(reduced_w) == 6
    assert max(int(np.abs(w).max()) for w in full_w) == 127
    assert max(int(np.abs(w).max()) for w in reduced_w) == 64
    meta = {p.key: p.value for p in onnx.load(reduced.path).metadata_props}
    assert json.loads(meta["surgeon.quantization"])["weight_bits"] == 7 and reduced.weight_bits == 7 == 15 - full.weight_bits
    assert reduced.held_out.top1 >= 0.99


def test_reduce_range_is_refused_for_tensorrt(grown, digits, tmp_path):
    with pytest.raises(SurgeonError, match="--reduce-range .* is for --target ort-cpu"):
        quantize_file(grown[1], tmp_path / "q.onnx", QuantizeOptions(str(digits), reduce_range=True))
    res = CliRunner().invoke(cli, ["quantize", str(grown[1]), "--calib", str(digits), "--reduce-range", "-o", str(tmp_path / "q.onnx")])
    assert res.exit_code == 1 and res.output.count("\n") == 1 and "TensorRT takes full 8-bit weights" in res.output
    res = CliRunner().invoke(cli, ["export", str(grown[0]), "--reduce-range", "-o", str(tmp_path / "e.onnx")])
    assert res.exit_code == 2 and "options of --precision int8" in res.output
    assert not (tmp_path / "q.onnx").exists() and not (tmp_path / "e.onnx").exists()


def test_cli_reduce_range_and_the_hint_on_a_cpu_without_vnni(grown, digits, tmp_path, monkeypatch):
    """The ort-cpu report suggests --reduce-range where the CPU has no VNNI, and not once it is used."""
    import surgeon.onnxrt

    monkeypatch.setattr(surgeon.onnxrt, "u8s8_saturates", lambda: True)
    runner = CliRunner()
    res = runner.invoke(cli, ["quantize", str(grown[1]), "--calib", str(digits), "--target", "ort-cpu", "-o", str(tmp_path / "a.onnx")])
    assert res.exit_code == 0 and "has no VNNI" in res.output and "--reduce-range" in res.output
    res = runner.invoke(cli, ["quantize", str(grown[1]), "--calib", str(digits), "--target", "ort-cpu", "--reduce-range",
                              "-o", str(tmp_path / "b.onnx")])
    assert res.exit_code == 0 and "7-bit int8 weights" in res.output and "has no VNNI" not in res.output
    monkeypatch.setattr(surgeon.onnxrt, "u8s8_saturates", lambda: False)
    res = runner.invoke(cli, ["quantize", str(grown[1]), "--calib", str(digits), "--target", "ort-cpu", "-o", str(tmp_path / "c.onnx")])
    assert res.exit_code == 0 and "has no VNNI" not in res.output
