"""What verification says: the check line names the error the tolerance bounds, and only export
(which writes the model) says a failed model was not written."""

from __future__ import annotations

import re
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from surgeon.cli import cli
from surgeon.errors import SurgeonError
from surgeon.export.onnx_export import export_checkpoint
from surgeon.grow.recipe import GrowStep
from tests.export.test_onnx_export import _grown_checkpoint

LINE = re.compile(r"max \|err\| (\S+) = (\S+) of the logits' scale \(tolerance (\S+) of scale\): (ok|FAIL)$")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("msg")
    ckpt = _grown_checkpoint(d / "grown.pt", [GrowStep("wide", "classifier.0", 16)])
    return ckpt, export_checkpoint(ckpt, d / "model.onnx").path


def test_check_lines_say_what_the_tolerance_bounds(exported):
    ckpt, model = exported
    res = CliRunner().invoke(cli, ["verify", str(model), "--against", str(ckpt)])
    assert res.exit_code == 0, res.output
    lines = [m for m in map(LINE.search, res.output.splitlines()) if m]
    assert len(lines) == 2 and "relative" not in res.output, res.output  # batches 1 and 5
    for m in lines:
        rel, tol, verdict = float(m[2]), float(m[3]), m[4]
        assert tol == 1e-4 and verdict == "ok" and rel <= tol


def test_verify_failure_does_not_claim_a_file_was_not_written(tmp_path, exported):
    ckpt, model = exported
    bad = onnx.load(model)
    init = max(bad.graph.initializer, key=lambda t: len(t.raw_data))
    arr = onnx.numpy_helper.to_array(init) * 1.5
    init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    path = tmp_path / "bad.onnx"
    onnx.save(bad, path)
    res = CliRunner().invoke(cli, ["verify", str(path), "--against", str(ckpt)])
    assert res.exit_code == 1 and res.output.count("\n") == 1, res.output
    assert "differs from PyTorch" in res.output and "not written" not in res.output, res.output
    assert f"{path} does not match {ckpt}" in res.output


def test_export_failure_still_says_the_model_was_not_written(tmp_path, exported):
    ckpt, _ = exported
    with pytest.raises(SurgeonError, match=r"^export: ONNX Runtime differs .*; the model was not written$"):
        export_checkpoint(ckpt, tmp_path / "m.onnx", tolerance=0.0)
    assert not (tmp_path / "m.onnx").exists()
