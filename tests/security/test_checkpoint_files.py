"""Checkpoints that carry code are refused by name, without running it."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from click.testing import CliRunner

import surgeon
from surgeon.cli import cli
from surgeon.errors import CheckpointError


class _Shell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))  # torch 2.14: "unsupported GLOBAL ... is blocked"


class _Call:
    def __reduce__(self):
        return (print, ("ran",))  # "Unsupported global: GLOBAL print ..."


@pytest.mark.parametrize("payload", ["shell", "call", "module"])
def test_pickled_objects_are_named_as_such(tmp_path, payload):
    marker = tmp_path / "RAN"
    obj = {"shell": lambda: {"x": _Shell(marker)}, "call": lambda: {"x": _Call()},
           "module": lambda: torch.nn.Linear(2, 2)}[payload]()
    path = tmp_path / "model.pt"
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match="contains pickled Python objects, which surgeon refuses to load"):
        surgeon.load(path)
    res = CliRunner().invoke(cli, ["export", str(path), "-o", str(tmp_path / "m.onnx")])
    assert res.exit_code == 1 and "pickled Python objects" in res.stderr and res.stderr.count("\n") == 1
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 5:UserWarning")  # torch's note on reading it
def test_a_plain_pickle_is_not_called_corrupt(tmp_path):
    path = tmp_path / "weights.pt"
    with open(path, "wb") as f:
        pickle.dump({"w": [1.0, 2.0]}, f, protocol=5)
    with pytest.raises(CheckpointError, match="plain Python pickle, not a torch checkpoint"):
        surgeon.load(path)
