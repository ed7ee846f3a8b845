"""``--resume`` trusts only the command line: a training state cannot ask to import code, and a
resumed run writes only into the folder being resumed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from surgeon.cli import cli

from tests.conftest import DIGITNET

EVIL = """
from pathlib import Path
Path(__file__).with_name("IMPORTED").write_text("ran")  # what an attacker's code would do
from surgeon.zoo.digitnet import DigitNet as Net
"""


def _invoke(*args: str):
    return CliRunner().invoke(cli, ["finetune", *args])


@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "orig"
    res = _invoke("--model", str(DIGITNET), "--grow", "wide", "--layer", "classifier.3", "--units", "16",
                  "--epochs", "1", "-j", "0", "--device", "cpu", "--quiet", "--output-dir", str(out))
    assert res.exit_code == 0, res.output
    return out


def _edit_state(folder: Path, edit) -> None:
    raw = torch.load(folder / "checkpoint.pt", weights_only=True)
    edit(raw)
    torch.save(raw, folder / "checkpoint.pt")


def _copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


def _point_at_user_code(tmp_path: Path, run: Path) -> tuple[Path, Path]:
    code = tmp_path / "code"
    code.mkdir()
    (code / "evil.py").write_text(EVIL)
    spec = f"{code / 'evil.py'}:Net"

    def edit(raw):
        raw["config"]["trust_code"] = True
        raw["config"]["model"] = spec
        raw["checkpoint"]["base"]["model"] = spec

    folder = _copy(run, tmp_path / "hostile")
    _edit_state(folder, edit)
    return folder, code / "IMPORTED"


def test_a_state_that_says_trust_code_does_not_run_code(tmp_path, one_epoch_run):
    folder, marker = _point_at_user_code(tmp_path, one_epoch_run)
    res = _invoke("--resume", str(folder), "--epochs", "2", "--quiet")
    assert res.exit_code == 1, res.output
    assert "--trust-code" in res.stderr and res.stderr.count("\n") == 1, res.stderr
    assert not marker.exists(), "resume imported the code a training state named"


def test_trust_code_on_the_command_line_is_honoured_on_resume(tmp_path, one_epoch_run):
    folder, marker = _point_at_user_code(tmp_path, one_epoch_run)
    res = _invoke("--resume", str(folder), "--epochs", "2", "--quiet", "--trust-code")
    assert res.exit_code == 0, res.output
    assert marker.exists()
    assert len((folder / "metrics.jsonl").read_text().splitlines()) == 2


def test_resumed_outputs_go_to_the_resumed_folder_not_where_the_file_says(tmp_path, one_epoch_run):
    aimed = tmp_path / "elsewhere"
    copy = _copy(one_epoch_run, tmp_path / "copy")
    _edit_state(copy, lambda raw: raw["config"].update(output_dir=str(aimed)))
    before = {p.name: p.read_bytes() for p in one_epoch_run.iterdir()}
    res = _invoke("--resume", str(copy / "checkpoint.pt"), "--epochs", "2", "--quiet")
    assert res.exit_code == 0, res.output
    assert not aimed.exists()
    assert {p.name: p.read_bytes() for p in one_epoch_run.iterdir()} == before, "the original run was rewritten"
    rows = [json.loads(line) for line in (copy / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert json.loads((copy / "run.json").read_text())["output_dir"] == str(copy)
    assert torch.load(copy / "grown.pt", weights_only=True)["history"]["epochs"][-1]["epoch"] == 2
    assert "written to" not in res.stderr


def test_resume_says_where_it_continues(tmp_path, one_epoch_run):
    copy = _copy(one_epoch_run, tmp_path / "copy")
    res = _invoke("--resume", str(copy), "--epochs", "2")
    assert res.exit_code == 0, res.output
    assert f"resuming {copy} after epoch 1 of 2" in res.stdout


@pytest.mark.parametrize("flag", [["--lr", "0.5"], ["--output-dir", "somewhere"], ["--model", "torchvision:vgg11"]])
def test_settings_that_resume_cannot_change_are_refused(tmp_path, one_epoch_run, flag):
    res = _invoke("--resume", str(one_epoch_run), *flag)
    assert res.exit_code == 1
    assert f"{flag[0]} cannot change" in res.stderr and res.stderr.count("\n") == 1, res.stderr


def test_a_state_with_nonsense_settings_is_one_line(tmp_path, one_epoch_run):
    copy = _copy(one_epoch_run, tmp_path / "copy")
    _edit_state(copy, lambda raw: raw["config"].update(epochs="many"))
    res = _invoke("--resume", str(copy), "--quiet")
    assert res.exit_code == 1
    assert "checkpoint.pt" in res.stderr and res.stderr.count("\n") == 1, res.stderr
