"""Runtime sessions on every backend this machine has, predict (API and CLI) and bench."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import surgeon
from surgeon.cli import cli
from surgeon.errors import SurgeonError
from surgeon.export.onnx_export import export_checkpoint
from surgeon.grow.recipe import GrowStep
from surgeon.runtime import Session
from surgeon.runtime.bench import bench
from surgeon.runtime.session import image_files
from surgeon.train.data import eval_transform
from tests.export.test_onnx_export import _grown_checkpoint


@pytest.fixture(scope="module")
def grown(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("runtime")
    ckpt = _grown_checkpoint(d / "grown.pt", [GrowStep("wide", "classifier.0", 32), GrowStep("wide", "features.8", 8)])
    return ckpt, export_checkpoint(ckpt, d / "model.onnx").path


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (40 + i, 36, 3), dtype=np.uint8)).save(d / f"p{i}.png")
    return d


@pytest.mark.parametrize("backend", ["ort-cpu", "torch", "auto"])
def test_session_matches_pytorch(grown, backend):
    ckpt, onnx_path = grown
    path = ckpt if backend == "torch" else onnx_path
    session = Session(path, backend)
    assert session.backend == ("ort-cpu" if backend == "auto" else backend)
    x = np.random.default_rng(1).standard_normal((5, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        want = surgeon.load(ckpt)(torch.from_numpy(x)).numpy()
    got = session.run(x)
    assert got.dtype == np.float32 and got.shape == (5, 4)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert session.classes == ["a", "b", "c", "d"]


def test_predict_takes_paths_pil_and_arrays_alike(grown, photos):
    _, onnx_path = grown
    session = Session(onnx_path)
    path = photos / "p1.png"
    image = Image.open(path).convert("RGB")
    pre = eval_transform(session.artifact.preprocessing)(image).numpy()
    forms = [path, str(path), image, np.asarray(image), pre]
    results = session.predict(forms, topk=4)
    assert len(results) == 5
    for r in results[1:]:
        assert [p.index for p in r] == [p.index for p in results[0]]
        np.testing.assert_allclose([p.score for p in r], [p.score for p in results[0]], rtol=1e-5)
    top = results[0]
    assert sorted(p.label for p in top) == ["a", "b", "c", "d"] and abs(sum(p.score for p in top) - 1) < 1e-6
    assert [p.score for p in top] == sorted((p.score for p in top), reverse=True)
    assert len(session.predict(path, topk=2)[0]) == 2


def test_bad_inputs_and_backends_are_one_line_errors(grown, tmp_path):
    ckpt, onnx_path = grown
    session = Session(onnx_path)
    cases = [
        (lambda: session.run(np.zeros((2, 3, 8, 8), np.float32)), "expected a batch of shape [N, 3, 32, 32]"),
        (lambda: session.run(np.zeros((2, 3, 32, 32), np.uint8)), "expected a float batch"),
        (lambda: session.predict([np.zeros((3, 5, 5), np.float32)]), "preprocessed image of shape [3, 32, 32]"),
        (lambda: session.predict([42]), "cannot make an image of int"),
        (lambda: session.predict([tmp_path / "none.png"]), "cannot read image"),
        (lambda: session.predict([onnx_path], topk=0), "--topk must be at least 1"),
        (lambda: Session(onnx_path, "torch"), "backend torch cannot run a onnx file"),
        (lambda: Session(ckpt, "ort-cpu"), "backend ort-cpu cannot run a checkpoint file"),
        (lambda: Session(onnx_path, "ort-cuda"), "backend ort-cuda is not available here: pip install onnxruntime-gpu"),
        (lambda: Session(onnx_path, "tensorflow"), "--backend must be one of"),
        (lambda: Session(tmp_path / "missing.onnx"), "does not exist"),
    ]
    for fn, message in cases:
        with pytest.raises(SurgeonError) as info:
            fn()
        assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_engines_need_their_sidecar_and_a_gpu(grown, tmp_path):
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"\0" * 64)
    with pytest.raises(SurgeonError, match="has no m.engine.json beside it"):
        Session(engine)
    (tmp_path / "m.engine.json").write_text(json.dumps({"metadata": {"surgeon.classes": '["x", "y"]', "surgeon.preprocessing":
        '{"input_size": 32, "resize": 32, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}'},
        "build": {"input": "images", "batch": "1:2:4", "input_shape": [-1, 3, 32, 32], "ahead_of_time": True}}))
    if not torch.cuda.is_available():
        with pytest.raises(SurgeonError, match="cannot run m.engine: (no CUDA GPU is visible|`tensorrt_rtx` is not installed)"):
            Session(engine)


def test_foreign_onnx_without_metadata(grown, tmp_path):
    _, onnx_path = grown
    model = onnx.load(onnx_path)
    del model.metadata_props[:]
    onnx.save(model, tmp_path / "plain.onnx")
    session = Session(tmp_path / "plain.onnx")
    assert session.classes == ["0", "1", "2", "3"]
    assert session.artifact.preprocessing.input_size == 32
    assert len(session.predict(np.zeros((32, 32, 3), np.uint8))[0]) == 4


def test_concurrent_predicts_agree_with_sequential_ones(grown, photos):
    _, onnx_path = grown
    session = Session(onnx_path)
    files = sorted(photos.glob("*.png"))
    want = [[p.index for p in r] for r in session.predict(files, topk=4)]
    errors, results = [], []

    def worker():
        try:
            for _ in range(10):
                results.append([[p.index for p in r] for r in session.predict(files, topk=4)])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 80 and all(r == want for r in results)


def test_predict_cli_reports_a_corrupt_image_and_predicts_the_rest(grown, photos, tmp_path):
    _, onnx_path = grown
    folder = tmp_path / "imgs"
    folder.mkdir()
    for f in photos.glob("*.png"):
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    res = CliRunner().invoke(cli, ["predict", str(onnx_path), str(folder), "--topk", "2", "--json"])
    assert res.exit_code == 1
    doc = json.loads(res.stdout)
    assert [Path(p["image"]).name for p in doc["predictions"]] == [f"p{i}.png" for i in range(4)]
    assert all(len(p["top"]) == 2 for p in doc["predictions"])
    [err] = doc["errors"]
    assert err["image"].endswith("broken.jpg") and "cannot read image" in err["error"]
    assert "broken.jpg" in res.stderr
    res = CliRunner().invoke(cli, ["predict", str(onnx_path), str(folder / "p0.png"), str(folder / "p[12].png")])
    assert res.exit_code == 0 and res.output.count("\n") == 3 and "p0.png: " in res.output


def test_image_files_expands_folders_and_globs(photos):
    assert [p.name for p in image_files([str(photos)])] == [f"p{i}.png" for i in range(4)]
    assert [p.name for p in image_files([str(photos / "p[03].png"), str(photos / "p1.png")])] == ["p0.png", "p3.png", "p1.png"]
    with pytest.raises(SurgeonError, match="matches no file"):
        image_files([str(photos / "*.gif")])


def test_bench_interleaves_and_reports(grown, tmp_path):
    ckpt, onnx_path = grown
    report = bench([Session(onnx_path), Session(ckpt)], [1, 3], warmup=1, iters=6)
    assert [r["batch"] for r in report["runs"]] == [1, 3]
    for run in report["runs"]:
        assert run["order"] == "ABBAABBA"  # alternating order: drift hits both models alike
        a, b = run["results"]
        assert a["backend"] == "ort-cpu" and b["backend"] == "torch" and a["calls"] == b["calls"] == 6
        assert a["median_ms"] <= a["p90_ms"] <= a["p99_ms"]
        assert run["ratio"] == pytest.approx(b["median_ms"] / a["median_ms"])
        assert a["throughput"] == pytest.approx(run["batch"] / (a["median_ms"] / 1e3))
    res = CliRunner().invoke(cli, ["bench", str(onnx_path), "--batch", "2", "--iters", "3", "--warmup", "0",
                                   "--json", str(tmp_path / "b.json")])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "b.json").read_text())
    assert doc["iters"] == 3 and "ratio" not in doc["runs"][0] and doc["runs"][0]["results"][0]["calls"] == 3
    res = CliRunner().invoke(cli, ["bench", str(onnx_path), "--batch", "x"])
    assert res.exit_code == 1 and "--batch must be comma-separated integers" in res.output


def test_every_backend_and_verification_run_through_one_runner_protocol(grown):
    """Session's backends and the verification runner are all surgeon.runner.Runner: `backend` and
    `run(batch) -> logits`; the in-memory verification runner and the file backend agree."""
    from surgeon.export.ort_runner import OrtRunner as VerificationRunner
    from surgeon.runner import Runner, run_batched

    ckpt, onnx_path = grown
    x = np.random.default_rng(1).standard_normal((5, 3, 32, 32)).astype(np.float32)
    runners = [Session(onnx_path, "ort-cpu")._runner, Session(ckpt, "torch")._runner, VerificationRunner(onnx_path)]
    assert all(isinstance(r, Runner) for r in runners)
    assert [r.backend for r in runners] == ["ort-cpu", "torch", "ort-cpu"]
    outs = [run_batched(r, x, batch=2) for r in runners]
    for out in outs[1:]:
        np.testing.assert_allclose(out, outs[0], rtol=1e-4, atol=1e-4)
    assert not isinstance(object(), Runner)
