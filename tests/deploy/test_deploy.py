"""The deploy side without PyTorch: Session, predict, bench and build on ONNX files load neither torch
nor torchvision, and reproduce PyTorch's numbers (preprocessing bit for bit, logits within 1e-4 of
their scale). Each check runs in a fresh interpreter, so what it imports is what it needs."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.deploy.conftest import HAS_TORCH

TORCH = ("torch", "torchvision")

# Runs a CLI command (argv) or Python code in a fresh interpreter; its last stderr line lists which of
# TORCH it ended up importing.
_RUNNER = """
import json, sys
mode, arg = sys.argv[1], sys.argv[2]
def report():
    print(json.dumps([m for m in %r if m in sys.modules]), file=sys.stderr)
try:
    if mode == "cli":
        from surgeon.cli import cli
        cli(json.loads(arg), prog_name="surgeon")
    else:
        exec(arg)
except SystemExit as exc:
    report()
    raise
report()
""" % (TORCH,)


def run(mode: str, arg, cwd: Path | None = None) -> tuple[subprocess.CompletedProcess, list[str]]:
    proc = subprocess.run([sys.executable, "-c", _RUNNER, mode, json.dumps(arg) if mode == "cli" else arg],
                          capture_output=True, text=True, cwd=cwd, timeout=300)
    lines = proc.stderr.strip().splitlines()
    return proc, json.loads(lines[-1]) if lines and lines[-1].startswith("[") else ["?"]


def test_this_virtualenv_is_what_it_claims():
    if "SURGEON_DEPLOY_ONLY" in __import__("os").environ:  # set by `make test` for .venv-deploy
        assert not HAS_TORCH, "the deploy virtualenv must not have PyTorch"
        with pytest.raises(ImportError):
            import torch  # noqa: F401
    else:
        pytest.skip("not the deploy-only virtualenv")


def test_session_reproduces_pytorch_without_torch(fixtures):
    ref = np.load(fixtures / "reference.npz")
    code = f"""
import numpy as np
from surgeon.runtime import Session
s = Session({str(fixtures / 'model.onnx')!r})
photos = [{str(fixtures / 'photos' / 'china.jpg')!r}, {str(fixtures / 'photos' / 'flower.jpg')!r}]
x = s.preprocess(photos)
np.savez({str(fixtures.parent / 'out-session.npz')!r}, inputs=x, logits=s.run(x))
assert s.backend == "ort-cpu", s.backend
print(s.predict(photos, topk=2))
"""
    proc, loaded = run("py", code)
    assert proc.returncode == 0, proc.stderr
    assert loaded == []
    got = np.load(fixtures.parent / "out-session.npz")
    np.testing.assert_array_equal(got["inputs"], ref["inputs"])  # torchvision's eval transform, bit for bit
    scale = np.abs(ref["logits"]).max()
    np.testing.assert_allclose(got["logits"], ref["logits"], rtol=0, atol=1e-4 * scale)


def test_predict_and_bench_cli_without_torch(fixtures):
    proc, loaded = run("cli", ["predict", str(fixtures / "model.onnx"), str(fixtures / "photos"), "--json", "--topk", "2"])
    assert proc.returncode == 0, proc.stderr
    assert loaded == []
    results = json.loads(proc.stdout)
    assert len(results["predictions"]) == 2 and results["errors"] == []
    proc, loaded = run("cli", ["bench", str(fixtures / "model.onnx"), "--vs", str(fixtures / "model-nofold.onnx"),
                               "--batch", "1,2", "--warmup", "1", "--iters", "3"])
    assert proc.returncode == 0, proc.stderr
    assert loaded == []


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx") is None, reason="needs tensorrt-rtx-cu12")
def test_build_engine_without_torch(fixtures, tmp_path):
    engine = tmp_path / "model.engine"
    proc, loaded = run("cli", ["build", str(fixtures / "model-nofold.onnx"), "-o", str(engine), "--batch", "1:2:4",
                               "--builder", "tensorrt-rtx"])
    assert proc.returncode == 0, proc.stderr
    assert loaded == []
    assert engine.stat().st_size > 0 and json.loads(engine.with_name("model.engine.json").read_text())["metadata"]
    # The engine's description reads without torch too (running it needs an RTX-class GPU).
    proc, loaded = run("py", f"from surgeon.runtime.artifact import read_artifact; print(read_artifact({str(engine)!r}).classes)")
    assert proc.returncode == 0 and loaded == [], proc.stderr


def test_quantize_without_torch(fixtures, tmp_path):
    out = tmp_path / "model.int8.onnx"
    # two photos: one calibrates, one is held out (agreement on one image is 0 or 1: not judged here)
    proc, loaded = run("cli", ["quantize", str(fixtures / "model.onnx"), "--calib", str(fixtures / "photos"), "-o", str(out),
                               "--min-agreement", "0"])
    assert proc.returncode == 0, proc.stderr
    assert loaded == []
    assert "held out  1 image(s): top-1 agreement" in proc.stdout and out.stat().st_size > 0
    proc, loaded = run("py", f"from surgeon.runtime import Session; print(Session({str(out)!r}).artifact.precision)")
    assert proc.returncode == 0 and proc.stdout.strip() == "int8" and loaded == [], proc.stderr


@pytest.mark.skipif(HAS_TORCH, reason="the missing-extra message needs an install without PyTorch")
@pytest.mark.parametrize("args", [["finetune", "--epochs", "1"], ["export", "grown.pt"], ["layers", "--model", "surgeon:digitnet"]])
def test_training_commands_name_the_extra(fixtures, args):
    if args[0] == "export":
        args = ["export", str(fixtures / "grown.pt"), "-o", "unused.onnx"]
    proc, _ = run("cli", args)
    assert proc.returncode == 1, proc.stderr
    first = proc.stderr.strip().splitlines()[0]
    assert first.startswith("error: ") and "pip install 'surgeon[train]'" in first, first


@pytest.mark.skipif(HAS_TORCH, reason="needs an install without PyTorch")
def test_session_on_a_checkpoint_names_the_extra(fixtures):
    proc, _ = run("py", f"from surgeon.runtime import Session; Session({str(fixtures / 'grown.pt')!r})")
    assert proc.returncode != 0 and "MissingExtraError" in proc.stderr and "surgeon[train]" in proc.stderr


@pytest.mark.skipif(HAS_TORCH, reason="needs an install without PyTorch")
def test_the_python_api_names_the_extra():
    proc, _ = run("py", "import surgeon; print(sorted(surgeon.__all__)); surgeon.grow_model")
    assert proc.returncode != 0 and "grow_model" in proc.stdout  # the names are listed; using one says what to install
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("surgeon.errors.MissingExtraError: surgeon.grow_model needs torch") and "surgeon[train]" in last


@pytest.mark.skipif(HAS_TORCH, reason="needs an install without PyTorch")
def test_the_python_quantize_api_needs_no_torch():
    proc, _ = run("py", "import surgeon, sys; surgeon.QuantizeOptions; surgeon.quantize; print('torch' in sys.modules)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "False"
