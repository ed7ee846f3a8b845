"""`surgeon layers` through click's test runner."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from surgeon.cli import cli


def run(*args: str):
    return CliRunner().invoke(cli, ["layers", *args], catch_exceptions=False)


def _rows(output: str) -> dict[str, str]:
    """First column → whole line of the table."""
    lines = [ln for ln in output.splitlines() if ln.strip()]
    assert lines[0].split()[:2] == ["layer", "type"]
    return {ln.split()[0]: ln for ln in lines[1:] if not ln.startswith("(")}


@pytest.fixture(scope="module")
def resnet_table():
    res = run("--model", "torchvision:resnet18", "--input-size", "64")
    assert res.exit_code == 0, res.output
    return res.output


def test_resnet18_lists_growable_only(resnet_table):
    rows = _rows(resnet_table)
    assert "layer4.1.conv1" in rows and "layer1.0.conv1" in rows
    assert "layer4.1.conv2" not in rows and "layer4.0.downsample.0" not in rows and "conv1" not in rows
    assert rows["layer4.1.conv1"].split()[1:5] == ["Conv2d", "512", "512", "3x3"]
    assert "2x2" in rows["layer4.1.conv1"]  # 512x2x2 output at --input-size 64
    assert "layers that cannot be grown are hidden" in resnet_table


def test_resnet18_all_shows_reasons():
    res = run("--model", "torchvision:resnet18", "--input-size", "64", "--all")
    assert res.exit_code == 0, res.output
    rows = _rows(res.output)
    assert "residual add" in rows["layer4.1.conv2"]
    assert "residual add" in rows["layer4.0.downsample.0"]
    assert rows["layer4.1.conv1"].rstrip().endswith("ok  ok") or rows["layer4.1.conv1"].split()[-2:] == ["ok", "ok"]
    assert "classifier head" in rows["fc"]
    assert "hidden" not in res.output


def test_json():
    res = run("--model", "torchvision:resnet18", "--input-size", "64", "--json", "--all")
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    by_name = {d["name"]: d for d in data}
    assert by_name["layer4.1.conv1"]["wide"] == "ok" and by_name["layer4.1.conv1"]["out_channels"] == 512
    assert by_name["layer4.1.conv1"]["out_shape"] == [1, 512, 2, 2]
    assert "residual add" in by_name["layer4.1.conv2"]["wide"]
    assert by_name["fc"]["is_head"] is True and sum(d["is_head"] for d in data) == 1
    assert set(data[0]) == {"name", "kind", "in_channels", "out_channels", "kernel", "out_shape", "is_head", "wide", "deep"}
    plain = json.loads(run("--model", "torchvision:resnet18", "--input-size", "64", "--json").output)
    assert {d["name"] for d in plain} == {d["name"] for d in data if d["wide"] == "ok" or d["deep"] == "ok"}


def test_checkpoint_model(digitnet_path):
    res = run("--model", str(digitnet_path))
    assert res.exit_code == 0, res.output
    rows = _rows(res.output)
    assert {"features.0", "features.4", "features.8", "classifier.0", "classifier.3"} <= set(rows)
    assert rows["classifier.3"].split()[1:4] == ["Linear", "128", "128"]
    assert "classifier.6" not in rows  # the head is hidden without --all


def test_unknown_model_is_one_error_line():
    res = CliRunner().invoke(cli, ["layers", "--model", "torchvision:resnet19"])
    assert res.exit_code == 1
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "resnet19" in lines[0]
    assert res.exception is None or isinstance(res.exception, SystemExit)


def test_missing_checkpoint_file_is_one_error_line(tmp_path):
    res = CliRunner().invoke(cli, ["layers", "--model", str(tmp_path / "nope.pt")])
    assert res.exit_code == 1
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:")


def test_missing_checkpoint_says_does_not_exist(tmp_path):
    res = CliRunner().invoke(cli, ["layers", "--model", str(tmp_path / "nope.pt")])
    assert "does not exist" in res.output.replace(str(tmp_path), "<DIR>")


@pytest.mark.parametrize("model, site, count", [  # < 1 s each: --weights none builds on the meta device
    ("convnext_tiny", "features.7.2.block.3", 18),   # every CNBlock's first MLP Linear
    ("vit_b_16", "encoder.layers.encoder_layer_11.mlp.0", 12),
    ("swin_t", "features.7.1.mlp.0", 12),
])
def test_transformer_and_convnext_mlps_are_growable(model, site, count):
    """The first Linear of each MLP (units on the last dim) is listed; attention and the second
    Linear (residual add) are not."""
    res = run("--model", f"torchvision:{model}", "--weights", "none", "--json", "--all")
    assert res.exit_code == 0, res.output
    rows = {d["name"]: d for d in json.loads(res.output)}
    assert rows[site]["wide"] == "ok" and rows[site]["deep"] == "ok"
    growable = [n for n, d in rows.items() if not d["is_head"] and (d["wide"] == "ok" or d["deep"] == "ok")]
    assert len(growable) == count and all(n.endswith((".mlp.0", ".block.3")) for n in growable), growable
    second = site[: -1] + ("5" if site.endswith("block.3") else "3")
    assert "residual add" in rows[second]["wide"] or "permute" in rows[second]["wide"]
