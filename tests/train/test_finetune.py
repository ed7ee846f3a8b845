"""Fine-tuning end to end on the offline digits task (tiny epochs; CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import surgeon
from surgeon.cli import cli
from surgeon.grow.recipe import GrowStep
from surgeon.train.config import FinetuneConfig
from surgeon.train.data import load_data
from surgeon.train.finetune import finetune

from tests.conftest import DIGITNET, ROOT


def _config(tmp_path: Path, **kw) -> FinetuneConfig:
    base = dict(model=str(DIGITNET), data="builtin:digits-target", output_dir=str(tmp_path / "run"), epochs=1,
                batch_size=32, workers=0, device="cpu", seed=0)
    base.update(kw)
    return FinetuneConfig(**base)


def _val_accuracy(model: torch.nn.Module, pre) -> float:
    data = load_data("builtin:digits-target", pre)
    loader = torch.utils.data.DataLoader(data.val, batch_size=256)
    correct = total = 0
    model.eval()
    with torch.no_grad():
        for x, y in loader:
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return correct / total


def test_cli_finetune_writes_every_output(tmp_path):
    out = tmp_path / "wide"
    res = CliRunner().invoke(cli, [
        "finetune", "--model", str(DIGITNET), "--data", "builtin:digits-target", "--grow", "wide",
        "--layer", "classifier.3", "--units", "32", "--epochs", "1", "-b", "64", "--workers", "0",
        "--device", "cpu", "--quiet", "--output-dir", str(out)])
    assert res.exit_code == 0, res.output
    assert "final val accuracy" in res.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and {"epoch", "train_loss", "val_loss", "val_acc", "lr", "gamma"} <= set(rows[0])
    assert rows[0]["lr_new"] == pytest.approx(10 * rows[0]["lr"])
    assert "classifier_3_norm" in rows[0]["gamma"]
    run = json.loads((out / "run.json").read_text())  # what surgeon compare groups runs by
    assert run["grow"][-1]["units"] == 32 and run["epochs"] == 1 and run["output_dir"] == str(out)
    with Image.open(out / "curves.png") as img:
        assert img.format == "PNG" and img.size[0] > 300
    raw = torch.load(out / "grown.pt", weights_only=True)
    assert raw["recipe"][-1] == {"op": "grow", "kind": "wide", "layer": "classifier.3", "units": 32, "init": "random",
                                 "norm": True, "gamma_init": "auto", "eps": 1e-6}
    assert raw["classes"] == ["5", "6", "7", "8", "9"]
    model = surgeon.load(out / "grown.pt")
    # The rebuilt model scores exactly what training measured on the same validation set.
    ckpt = model.surgeon_checkpoint
    assert _val_accuracy(model, ckpt.preprocessing) == pytest.approx(rows[0]["val_acc"], abs=1e-9)


def test_gamma_auto_initial_values_recorded(tmp_path):
    result = finetune(_config(tmp_path, grow=[GrowStep("wide", "classifier.3", 64)]), progress=False)
    raw = torch.load(result.output_dir / "grown.pt", weights_only=True)
    old, new = raw["history"]["gamma_init"]["classifier_3_norm"]
    # Same per-unit magnitude for both groups: γ_new = γ_old * sqrt(64 / 128).
    assert new == pytest.approx(old * (64 / 128) ** 0.5, rel=1e-5)
    assert old > 0


class _Interrupt(Exception):
    pass


def test_resume_continues_to_the_same_result(tmp_path):
    steps = [GrowStep("wide", "classifier.3", 32)]
    full = finetune(_config(tmp_path / "a", grow=steps, epochs=3, lr_step=2), progress=False)

    def stop_after_two(epoch, row):
        if epoch == 2:
            raise _Interrupt

    cfg = _config(tmp_path / "b", grow=steps, epochs=3, lr_step=2)
    with pytest.raises(_Interrupt):
        finetune(cfg, progress=False, on_epoch_end=stop_after_two)
    assert not (Path(cfg.output_dir) / "grown.pt").exists()
    resumed = finetune(FinetuneConfig(), resume=cfg.output_dir, progress=False)

    a = torch.load(full.output_dir / "grown.pt", weights_only=True)["state_dict"]
    b = torch.load(resumed.output_dir / "grown.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    strip = lambda h: [{k: v for k, v in r.items() if k != "time_s"} for r in h]  # noqa: E731
    assert strip(full.history) == strip(resumed.history)


def test_tune_new_keeps_pretrained_weights(tmp_path):
    result = finetune(_config(tmp_path, grow=[GrowStep("wide", "classifier.3", 16)], tune="new"), progress=False)
    before = torch.load(DIGITNET, weights_only=True)["state_dict"]
    after = torch.load(result.output_dir / "grown.pt", weights_only=True)["state_dict"]
    assert torch.equal(after["features.0.weight"], before["features.0.weight"])
    assert torch.equal(after["features.1.running_mean"], before["features.1.running_mean"])  # frozen BN stays put
    assert torch.equal(after["classifier.3.old.weight"], before["classifier.3.weight"])
    assert not torch.equal(after["classifier.3.new.weight"], _fresh_new_branch(tmp_path))


def _fresh_new_branch(tmp_path: Path) -> torch.Tensor:
    # The new branch right after growth (seeded identically): training must have moved it.
    from surgeon.train.finetune import prepare

    torch.manual_seed(0)
    p = prepare(_config(tmp_path / "fresh", grow=[GrowStep("wide", "classifier.3", 16)], tune="new"))
    return p.model.get_submodule("classifier.3").new.weight.detach()


def test_tune_top_trains_only_from_the_grown_layer_up(tmp_path):
    result = finetune(_config(tmp_path, grow=[GrowStep("wide", "classifier.3", 16)], tune="top"), progress=False)
    before = torch.load(DIGITNET, weights_only=True)["state_dict"]
    after = torch.load(result.output_dir / "grown.pt", weights_only=True)["state_dict"]
    assert torch.equal(after["classifier.0.weight"], before["classifier.0.weight"])     # fc6: below
    assert not torch.equal(after["classifier.3.old.weight"], before["classifier.3.weight"])  # fc7: grown


def test_baseline_has_no_growth(tmp_path):
    result = finetune(_config(tmp_path, baseline=True), progress=False)
    raw = torch.load(result.output_dir / "grown.pt", weights_only=True)
    assert [s["op"] for s in raw["recipe"]] == ["head", "head"]
    assert not any("norm" in k for k in raw["state_dict"])


def _image_folder(root: Path, bad: bool) -> Path:
    for split in ("train", "val"):
        for c, color in (("red", (200, 20, 20)), ("blue", (20, 20, 200))):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (40, 40), tuple(v + 5 * i for v in color)).save(d / f"{i}.png")
    if bad:
        (root / "train" / "red" / "broken.jpg").write_bytes(b"not an image at all")
    return root


def test_corrupt_image_is_named_or_skipped(tmp_path):
    data = _image_folder(tmp_path / "imgs", bad=True)
    args = ["finetune", "--model", str(DIGITNET), "--data", str(data), "--grow", "wide", "--layer", "classifier.3",
            "--units", "8", "--epochs", "1", "--workers", "0", "--quiet", "--output-dir", str(tmp_path / "o")]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 1
    assert "broken.jpg" in res.output and "--skip-bad-images" in res.output
    assert len(res.output.strip().splitlines()) == 1
    res = CliRunner().invoke(cli, args + ["--skip-bad-images"])
    assert res.exit_code == 0, res.output
    assert surgeon.load(tmp_path / "o" / "grown.pt").surgeon_checkpoint.classes == ["blue", "red"]


@pytest.mark.parametrize("args, message", [
    (["--data", "/nonexistent/folder"], "does not exist"),
    (["--baseline", "--grow", "wide", "--layer", "classifier.3", "--units", "4"], "--baseline"),
    (["--grow", "wide", "--layer", "classifier.9", "--units", "4"], "no layer named 'classifier.9'"),
    (["--grow", "wide", "--layer", "classifier.3"], "--units"),
    (["--grow", "wide", "--layer", "classifier.3", "--units", "4", "--gamma-init", "-3"], "positive"),
    (["--model", "torchvision:not_a_model"], "torchvision has no classification model"),
])
def test_bad_options_give_one_line_errors(tmp_path, args, message):
    base = ["finetune", "--model", str(DIGITNET), "--epochs", "1", "--workers", "0", "--quiet",
            "--output-dir", str(tmp_path / "o")]
    res = CliRunner().invoke(cli, base + args)
    assert res.exit_code != 0
    assert message in res.output
    assert not (tmp_path / "o" / "grown.pt").exists()


def test_resume_refuses_a_foreign_file(tmp_path):
    bad = tmp_path / "x.pt"
    torch.save({"a": torch.zeros(1)}, bad)
    res = CliRunner().invoke(cli, ["finetune", "--resume", str(bad)])
    assert res.exit_code == 1 and "not a surgeon training state" in res.output


@pytest.mark.slow
def test_torchrun_two_cpu_processes(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "surgeon",
           "finetune", "--model", str(DIGITNET), "--data", "builtin:digits-target", "--grow", "wide", "--layer",
           "classifier.3", "--units", "16", "--epochs", "2", "-b", "16", "--workers", "0", "--quiet",
           "--device", "cpu", "--output-dir", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    model = surgeon.load(out / "grown.pt")
    # Validation was split across the two ranks and summed: it must equal a full single-process pass.
    assert _val_accuracy(model, model.surgeon_checkpoint.preprocessing) == pytest.approx(rows[-1]["val_acc"], abs=1e-9)


@pytest.mark.slow
def test_demo_command_prints_both_accuracies(tmp_path):
    res = CliRunner().invoke(cli, ["demo", "--epochs", "1", "--output-dir", str(tmp_path / "demo")])
    assert res.exit_code == 0, res.output
    assert "baseline" in res.output and "wide classifier.3 +128" in res.output
    assert (tmp_path / "demo" / "baseline" / "grown.pt").exists()
    assert (tmp_path / "demo" / "wide" / "grown.pt").exists()


def test_amp_on_cpu_trains_in_bfloat16(tmp_path):
    result = finetune(_config(tmp_path, grow=[GrowStep("wide", "features.8", 16)], amp=True), progress=False)
    row = result.history[0]
    assert 0.0 <= row["val_acc"] <= 1.0 and row["train_loss"] == row["train_loss"]  # finite, not NaN
    raw = torch.load(result.output_dir / "grown.pt", weights_only=True)
    assert all(v.dtype in (torch.float32, torch.int64) for v in raw["state_dict"].values())  # master weights stay fp32
