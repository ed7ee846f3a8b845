"""`surgeon build` and `surgeon export --trt`: which builder and GrowNorm implementation, the
optimization profile, the timing cache, atomic outputs and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from surgeon.cli import cli
from surgeon.errors import SurgeonError
from surgeon.export import lean
from surgeon.export.onnx_export import export_checkpoint
from surgeon.grow.recipe import GrowStep
from surgeon.trt import toolkit
from surgeon.trt.build import _parse, build_engine, choose_grownorm
from surgeon.trt.toolkit import find_toolkit
from tests.export.test_onnx_export import _grown_checkpoint

trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu12 is not installed")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("build")
    ckpt = _grown_checkpoint(d / "grown.pt", [GrowStep("wide", "classifier.0", 32), GrowStep("wide", "features.8", 8)])
    return ckpt, export_checkpoint(ckpt, d / "model.onnx").path


def _invoke(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_export_trt_writes_onnx_engine_and_sidecar_and_says_how(tmp_path, exported):
    ckpt, _ = exported
    res = _invoke("export", ckpt, "--trt", "-o", tmp_path / "net.engine", "--batch", "2:4:8", "--report", tmp_path / "r.json")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.engine", "net.engine.json", "net.onnx", "r.json"]
    assert "TensorRT-RTX" in res.output and "CPU-only" in res.output
    assert "GrowNorm  2 node(s): onnx function" in res.output and "no plugin layers" in res.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["engine"]["batch"] == "2:4:8" and report["engine"]["grownorm_impl"] == "onnx function"
    assert report["onnx"].endswith("net.onnx")


def test_build_profile_workspace_and_timing_cache_note(tmp_path, exported):
    _, onnx_path = exported
    cache = tmp_path / "timing.cache"
    report = build_engine(onnx_path, tmp_path / "a.engine", timing_cache=cache, workspace_mb=64)
    assert report.batch == "1:8:64" and report.workspace_mb == 64  # the batch range recorded at export
    # TensorRT-RTX's timing-cache calls are no-ops: say so rather than write an empty file.
    assert "not used: TensorRT-RTX has no timing cache" in report.timing_cache and not cache.exists()


def test_build_cli_overrides_the_batch(tmp_path, exported):
    _, onnx_path = exported
    res = _invoke("build", onnx_path, "-o", tmp_path / "m.plan", "--batch", "1:1:2", "--report", tmp_path / "b.json")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "b.json").read_text())["batch"] == "1:1:2"
    assert "images [-1, 3, 32, 32] for batch 1:1:2" in res.output


@pytest.mark.parametrize("args, message", [
    (["--precision", "fp16"], "is an fp32 graph, but fp16 was asked"),
    (["--plugin", "on"], "--plugin on: the GrowNorm plugin cannot be used: TensorRT-RTX has no plugin layers"),
    (["--workspace", "0"], "--workspace must be a positive number"),
    (["--batch", "4:2:1"], "--batch needs 1 <= MIN <= OPT <= MAX"),
    (["--builder", "tensorrt"], "--builder tensorrt:"),
])
def test_build_refusals_are_one_line_and_write_nothing(tmp_path, exported, args, message):
    _, onnx_path = exported
    res = _invoke("build", onnx_path, "-o", tmp_path / "x.engine", *args)
    assert res.exit_code == 1
    assert message in res.output and res.output.count("\n") == 1, res.output
    assert list(tmp_path.iterdir()) == []


def test_export_trt_plugin_on_fails_before_exporting(tmp_path, exported):
    ckpt, _ = exported
    res = _invoke("export", ckpt, "--trt", "--plugin", "on", "-o", tmp_path / "m.onnx")
    assert res.exit_code == 1 and "no plugin layers" in res.output
    assert list(tmp_path.iterdir()) == []


def test_bad_onnx_files(tmp_path):
    (tmp_path / "junk.onnx").write_bytes(b"\x00garbage")
    for path, message in ((tmp_path / "junk.onnx", "is not a readable ONNX model"), (tmp_path / "none.onnx", "does not exist")):
        res = _invoke("build", path)
        assert res.exit_code == 1 and message in res.output and res.output.count("\n") == 1, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.onnx"]


def test_no_tensorrt_at_all_says_what_to_install(monkeypatch, exported):
    _, onnx_path = exported
    monkeypatch.setattr(toolkit, "_import", lambda name: None)
    with pytest.raises(SurgeonError, match="no TensorRT is installed; install `tensorrt`.*pip install tensorrt-rtx-cu12"):
        build_engine(onnx_path)


def test_plugin_choice_without_plugin_layers():
    tk = find_toolkit("tensorrt-rtx")
    assert choose_grownorm(tk, "auto", 2)[0] == "onnx function"
    assert choose_grownorm(tk, "off", 2) == ("onnx function", "--plugin off: the model's surgeon.GrowNorm function in standard TensorRT layers")
    assert choose_grownorm(tk, "auto", 0)[0] == "-"
    with pytest.raises(SurgeonError, match="no plugin layers"):
        choose_grownorm(tk, "on", 1)


@pytest.mark.parametrize("external", [False, True], ids=["one-file", "external-data"])
def test_forcing_the_function_parses_an_inlined_copy(tmp_path, monkeypatch, external):
    """--plugin off with a registered plugin parses a copy with the function inlined (written beside
    the original so external data is still found, and removed afterwards)."""
    if external:
        monkeypatch.setattr(lean, "EXTERNAL_DATA_THRESHOLD", 10_000)
    ckpt = _grown_checkpoint(tmp_path / "g.pt", [GrowStep("wide", "classifier.0", 16)])
    path = export_checkpoint(ckpt, tmp_path / "m.onnx").path
    assert (tmp_path / "m.onnx.data").exists() == external
    tk = find_toolkit("tensorrt-rtx")
    builder = trt.Builder(tk.logger().native)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    before = sorted(p.name for p in tmp_path.iterdir())
    _parse(tk, network, path, onnx.load(path, load_external_data=False), force_function=True, plugin=False)
    assert network.num_layers > 10
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_the_plugin_parses_a_copy_with_axis_spelled_out(tmp_path, monkeypatch):
    """tensorrt.plugin has no attribute defaults and the parser omits absent attributes: a plugin
    build parses a copy whose GrowNorm nodes say axis=1 (the file itself keeps omitting it)."""
    import surgeon.trt.build as build_mod

    ckpt = _grown_checkpoint(tmp_path / "g.pt", [GrowStep("wide", "classifier.0", 16)])
    path = export_checkpoint(ckpt, tmp_path / "m.onnx").path
    parsed = []
    save = build_mod.onnx.save
    monkeypatch.setattr(build_mod.onnx, "save", lambda model, f: (parsed.append(model), save(model, f))[1])
    tk = find_toolkit("tensorrt-rtx")
    network = trt.Builder(tk.logger().native).create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    _parse(tk, network, path, onnx.load(path, load_external_data=False), force_function=False, plugin=True)
    [model] = parsed
    nodes = [n for n in model.graph.node if n.op_type == "GrowNorm"]
    assert nodes and all(onnx.helper.get_node_attr_value(n, "axis") == 1 for n in nodes)
    assert not any(a.name == "axis" for n in onnx.load(path).graph.node if n.op_type == "GrowNorm" for a in n.attribute)
    assert network.num_layers > 10  # TensorRT-RTX has no plugins: the function, reading axis=1, was used
