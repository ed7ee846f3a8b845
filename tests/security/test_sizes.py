"""Sizes are validated before anything allocates them; failures are one line, without a traceback."""

from __future__ import annotations

import torch
from click.testing import CliRunner

from surgeon.cli import cli
from surgeon.checkpoint import read_checkpoint, save_checkpoint
from surgeon.errors import CheckpointError
from surgeon.preprocessing import MAX_INPUT_SIZE, Preprocessing, PreprocessingError

import pytest


def _one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    err = result.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert "Traceback" not in result.output
    return err


@pytest.mark.parametrize("field,value", [("input_size", 100_000), ("input_size", 0), ("resize", -3),
                                         ("std", [1.0, 0.0, 1.0]), ("mean", [0.5, 0.5])])
def test_preprocessing_rejects_values_no_model_has(field, value):
    d = Preprocessing().to_dict()
    d[field] = value
    with pytest.raises(PreprocessingError, match=field):
        Preprocessing.from_dict(d)


def test_checkpoint_with_a_huge_input_size_is_refused_before_building(tmp_path, digitnet_path):
    raw = torch.load(digitnet_path, weights_only=True)
    raw["preprocessing"]["input_size"] = 100_000
    bad = tmp_path / "huge.pt"
    torch.save(raw, bad)
    with pytest.raises(CheckpointError, match=r"huge\.pt is a damaged surgeon checkpoint .*input_size .* 1 to 4096"):
        read_checkpoint(bad)
    err = _one_line_error(CliRunner().invoke(cli, ["export", str(bad), "-o", str(tmp_path / "m.onnx")]))
    assert "100000" in err
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("size", [MAX_INPUT_SIZE + 1, 0])
def test_input_size_flag_is_bounded(size):
    err = _one_line_error(CliRunner().invoke(cli, ["layers", "--model", "surgeon:digitnet", "--input-size", str(size)]))
    assert "--input-size must be a whole number of pixels" in err


def test_input_size_too_small_for_the_model_is_one_line_without_fx_dumps(tmp_path):
    result = CliRunner().invoke(cli, ["layers", "--model", "torchvision:alexnet", "--weights", "none", "--input-size", "20"])
    err = _one_line_error(result)
    assert "does not run on a 3x20x20 image" in err and "Output size is too small" in err
    assert "ShapeProp" not in err and "meta=" not in err


def test_finetune_refuses_images_over_max_image_pixels(tmp_path):
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.new("RGB", (40, 30)).save(tmp_path / cls / f"{i}.png")
    res = CliRunner().invoke(cli, ["finetune", "--data", str(tmp_path), "--max-image-pixels", "1000", "--epochs", "1",
                                   "-j", "0", "--quiet", "--output-dir", str(tmp_path / "run")])
    err = _one_line_error(res)
    assert "1,200 pixels" in err and "--max-image-pixels" in err
