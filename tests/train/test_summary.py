"""What fine-tuning says before epoch 1, and how it reacts to a diverging run."""

from __future__ import annotations

import math

import pytest
from click.testing import CliRunner

from surgeon.cli import cli
from surgeon.errors import SurgeonError
from surgeon.train.summary import EXPLODED, LossWatch


def test_loss_watch_stops_on_a_non_finite_loss():
    watch = LossWatch(classes=4, lr=0.01)
    with pytest.raises(SurgeonError, match=r"val loss became nan in epoch 3; the run diverged: lower --lr \(now 0.01\)"):
        watch.check(3, train_loss=1.0, val_loss=math.nan)


def test_loss_watch_warns_once_when_the_loss_explodes():
    watch = LossWatch(classes=4, lr=0.01)
    chance = math.log(4)
    assert watch.check(1, train_loss=chance, val_loss=EXPLODED * chance) is None  # at the limit: fine
    alarm = watch.check(2, train_loss=1.0, val_loss=4000.0)
    assert alarm is not None and alarm.startswith("epoch 2: val loss 4000") and "diverging" in alarm
    assert watch.check(3, train_loss=1.0, val_loss=27000.0) is None  # said once


def test_finetune_says_what_it_found_and_grew_before_epoch_1(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the repository: the default --model must still be found
    res = CliRunner().invoke(cli, ["finetune", "--grow", "wide", "--layer", "classifier.3", "--units", "16",
                                   "--epochs", "1", "-j", "0", "--output-dir", "run"])
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert "data builtin:digits-target: 5 classes (5, 6, 7, 8, 9); 179 train, 717 val images; input 32px" in out
    assert "model surgeon:digitnet" in out and "head classifier.6 -> 5 classes; training on cpu" in out
    assert "grew wide in classifier.3: +16 units (init random), GrowNorm classifier_3_norm groups 128+16" in out
    # classifier.3's 16 new rows (16 x 128 weights + 16 biases) and GrowNorm's γ (128 + 16); the
    # new head (the only reader of the new units) is not counted.
    assert "new parameters 2,208 (" in out
    assert out.index("grew wide") < out.index("epoch 1/1")


def test_baseline_runs_outside_the_repository(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(cli, ["finetune", "--baseline", "--epochs", "1", "-j", "0", "--quiet", "--output-dir", "b"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "b" / "grown.pt").exists()


def test_a_diverging_run_is_not_silent(tmp_path):
    res = CliRunner().invoke(cli, ["finetune", "--baseline", "--lr", "100", "--epochs", "2", "-j", "0", "--quiet",
                                   "--output-dir", str(tmp_path / "d")])
    assert "diverg" in res.stderr, res.output
