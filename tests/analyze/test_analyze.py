"""``surgeon analyze`` on grown DigitNets: artifacts, accuracies checked independently, one-line errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from surgeon.checkpoint import read_checkpoint
from surgeon.cli import cli
from surgeon.grow.grownorm import GrowNorm
from surgeon.train.data import load_data

DATA = "builtin:digits-target"
MAX_IMAGES = 120


def _finetune(out: Path, digitnet: Path, *grow: str) -> Path:
    args = ["finetune", "--model", str(digitnet), "--data", DATA, *grow, "--epochs", "1", "-b", "64",
            "--workers", "0", "--calib-samples", "64", "--quiet", "--output-dir", str(out)]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    return out / "grown.pt"


def _analyze(ckpt: Path, out: Path, *extra: str):
    return CliRunner().invoke(cli, ["analyze", str(ckpt), "--data", DATA, "-o", str(out),
                                    "--max-images", str(MAX_IMAGES), "--units", "2", *extra])


@pytest.fixture(scope="module")
def grown(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("analyze")
    digitnet = Path(__file__).resolve().parents[2] / "models" / "digitnet.pt"
    torch.manual_seed(0)
    return {
        # fc7 widened (the paper's WA-CNN)
        "fc": _finetune(root / "fc", digitnet, "--grow", "wide", "--layer", "classifier.3", "--units", "16"),
        # a conv layer widened and a layer deepened: two GrowNorms, one with a single group
        "conv": _finetune(root / "conv", digitnet, "--grow", "wide", "--layer", "features.8",
                          "--grow", "deep", "--layer", "classifier.3", "--units", "8"),
    }


@pytest.fixture(scope="module")
def reports(grown, tmp_path_factory) -> dict[str, Path]:
    out = {}
    for key, ckpt in grown.items():
        d = tmp_path_factory.mktemp(f"report_{key}")
        res = _analyze(ckpt, d)
        assert res.exit_code == 0, res.output
        assert "wrote" in res.output
        out[key] = d
    return out


def _accuracy(model, dataset, indices) -> float:
    images = torch.stack([dataset[i][0] for i in indices])
    labels = torch.tensor([int(dataset[i][1]) for i in indices])
    with torch.no_grad():
        return float((model(images).argmax(1) == labels).float().mean())


def _model_and_val(ckpt_path: Path):
    ckpt = read_checkpoint(ckpt_path)
    return ckpt, load_data(DATA, ckpt.preprocessing, augment=False).val


@pytest.mark.parametrize("key", ["fc", "conv"])
def test_artifacts_exist_and_are_valid(reports, key):
    d = reports[key]
    metrics = json.loads((d / "metrics.json").read_text())
    html = (d / "index.html").read_text()
    refs = re.findall(r"(?:src|href)='([^']+)'", html)
    assert refs and all((d / r).is_file() for r in refs), refs
    pngs = sorted(d.glob("*.png"))
    assert {p.name for p in pngs} == {r for r in refs if r.endswith(".png")}
    for p in pngs:
        with Image.open(p) as im:
            im.verify()
            assert im.format == "PNG"
    assert metrics["images"] == MAX_IMAGES == len(metrics["image_indices"])
    assert metrics["probe"]["stratified"] and metrics["probe"]["train_images"] + metrics["probe"]["test_images"] == MAX_IMAGES
    assert not list(d.glob(".*.tmp"))  # atomic writes leave no temporaries
    for layer in metrics["layers"].values():
        for fig in layer["figures"].values():
            assert (d / fig).is_file()
        assert layer["gamma_history"]["init"] is not None and len(layer["gamma_history"]["epochs"]) == 1
        assert "gamma_history" in layer["figures"]
        for g, tops in layer["top_units"].items():
            assert len(tops) == 2 and all(len(t["images"]) == 5 for t in tops)
            assert f"units_{g}" in layer["figures"]
        for v in layer["probe_accuracy"].values():
            assert v is not None and 0.0 <= v <= 1.0


def test_old_new_accuracy_fc_matches_independent_computation(grown, reports):
    metrics = json.loads((reports["fc"] / "metrics.json").read_text())
    [layer] = metrics["layers"].values()
    assert layer["kind"] == "widened" and layer["groups"] == [128, 16] and not layer["conv"]
    assert layer["feature_pooling"].startswith("none")
    assert set(layer["accuracy"]) == {"both", "old_only", "new_only"}
    assert set(layer["probe_accuracy"]) == {"old", "new", "both"}
    ckpt, val = _model_and_val(grown["fc"])
    idx = metrics["image_indices"]
    model = ckpt.build_model()
    assert _accuracy(model, val, idx) == pytest.approx(layer["accuracy"]["both"])
    assert metrics["accuracy"] == pytest.approx(layer["accuracy"]["both"])
    # Zero the other group's input columns of the consumer: the head reads the GrowNorm output
    # through Dropout only, an identity in eval mode.
    head = model.get_submodule("classifier.6")
    assert head.in_features == 144
    full = head.weight.detach().clone()
    for group, cols in (("old_only", slice(128, 144)), ("new_only", slice(0, 128))):
        with torch.no_grad():
            head.weight.copy_(full)
            head.weight[:, cols] = 0
        assert _accuracy(model, val, idx) == pytest.approx(layer["accuracy"][group]), group


@pytest.mark.parametrize("key", ["fc", "conv"])
def test_old_new_accuracy_matches_zeroed_gamma(grown, reports, key):
    """Zeroing γ of a group zeroes its GrowNorm outputs: the same model as the analysis' hook."""
    metrics = json.loads((reports[key] / "metrics.json").read_text())
    ckpt, val = _model_and_val(grown[key])
    idx = metrics["image_indices"]
    widened = {n: l for n, l in metrics["layers"].items() if l["kind"] == "widened"}
    assert widened
    for name, layer in widened.items():
        model = ckpt.build_model()
        norm = model.get_submodule(name)
        assert isinstance(norm, GrowNorm)
        old = norm.groups[0]
        full = norm.gamma.detach().clone()
        for group, zero in (("old_only", slice(old, None)), ("new_only", slice(0, old))):
            with torch.no_grad():
                norm.gamma.copy_(full)
                norm.gamma[zero] = 0
            assert _accuracy(model, val, idx) == pytest.approx(layer["accuracy"][group]), (name, group)


def test_conv_and_deepened_layers(reports):
    metrics = json.loads((reports["conv"] / "metrics.json").read_text())
    layers = metrics["layers"]
    conv = layers["features_8_norm"]
    assert conv["conv"] and conv["groups"] == [64, 8] and "positions" in conv["feature_pooling"]
    deep = [l for l in layers.values() if l["kind"] == "deepened"]
    assert len(deep) == 1 and len(deep[0]["groups"]) == 1
    assert set(deep[0]["accuracy"]) == {"both"} and set(deep[0]["probe_accuracy"]) == {"units"}
    assert set(deep[0]["top_units"]) == {"units"}
    html = (reports["conv"] / "index.html").read_text()
    assert "average-pooled over spatial positions" in html and "deepened layer" in html
    # γ statistics agree with the checkpoint
    assert conv["gamma"]["old"]["count"] == 64 and conv["gamma"]["new"]["count"] == 8


def test_gamma_history_absent_is_reported(grown, tmp_path):
    raw = torch.load(grown["fc"], weights_only=True)
    raw["history"] = {}
    ckpt = tmp_path / "nohist.pt"
    torch.save(raw, ckpt)
    res = _analyze(ckpt, tmp_path / "rep", "--max-images", "40")
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    [layer] = metrics["layers"].values()
    assert layer["gamma_history"] is None and "gamma_history" not in layer["figures"]
    assert "does not record γ per epoch" in (tmp_path / "rep" / "index.html").read_text()


def _one_line_error(res) -> str:
    assert res.exit_code == 1, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    return lines[0]


def test_missing_checkpoint(tmp_path):
    line = _one_line_error(_analyze(tmp_path / "nope.pt", tmp_path / "rep"))
    assert "does not exist" in line


def test_model_without_grownorm(tmp_path):
    digitnet = Path(__file__).resolve().parents[2] / "models" / "digitnet.pt"
    line = _one_line_error(_analyze(digitnet, tmp_path / "rep"))
    assert line == "error: nothing to analyze: the model has no GrowNorm (it was not grown with normalization)"
    assert not (tmp_path / "rep").exists()


def test_data_with_other_number_of_classes(grown, tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "three"
    for cls in ("a", "b", "c"):
        (data / cls).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(data / cls / f"{i}.png")
    res = CliRunner().invoke(cli, ["analyze", str(grown["fc"]), "--data", str(data), "-o", str(tmp_path / "rep")])
    line = _one_line_error(res)
    assert "3 classes" in line and "trained on 5" in line
