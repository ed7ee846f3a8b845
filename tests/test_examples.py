"""examples/ run as scripts, on small settings, and leave a checkpoint and an ONNX file that load.
Each takes some 20-30 s on the 2-core CI machine (PyTorch's import, growth, one short epoch, the
export and its verification), so they are marked slow."""

from __future__ import annotations

import json
import subprocess
import sys

import onnx
import pytest

import surgeon

from tests.conftest import ROOT

SMALL = ["--epochs", "1", "-b", "8", "--limit", "64"]


def _run(script: str, out, *extra: str) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / script), *SMALL, "--output-dir", str(out), *extra],
                          capture_output=True, text=True, timeout=300, cwd=out.parent)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


def _check_outputs(out) -> None:
    model = surgeon.load(out / "grown.pt")
    assert model.surgeon_checkpoint.classes == ["5", "6", "7", "8", "9"]
    assert [s.op for s in model.surgeon_checkpoint.recipe] == ["head", "grow"]
    meta = {p.key: p.value for p in onnx.load(out / "model.onnx", load_external_data=False).metadata_props}
    assert json.loads(meta["surgeon.classes"]) == ["5", "6", "7", "8", "9"]
    assert meta["surgeon.base_model"] == "surgeon:digitnet"


@pytest.mark.slow
def test_plain_loop(tmp_path):
    stdout = _run("plain_loop.py", tmp_path / "plain")
    assert "epoch 1:" in stdout and "ONNX Runtime vs PyTorch" in stdout
    _check_outputs(tmp_path / "plain")
    history = surgeon.load(tmp_path / "plain" / "grown.pt").surgeon_checkpoint.history
    assert [row["epoch"] for row in history["epochs"]] == [1] and "classifier_3_norm" in history["gamma_init"]


@pytest.mark.slow
def test_lightning_loop(tmp_path):
    pytest.importorskip("lightning")
    stdout = _run("lightning_loop.py", tmp_path / "lightning", "--accelerator", "cpu")
    assert "val accuracy" in stdout and "ONNX Runtime vs PyTorch" in stdout
    _check_outputs(tmp_path / "lightning")
