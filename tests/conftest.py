"""Shared fixtures. Tests run on the CPU; ``gpu`` tests skip without CUDA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DIGITNET = ROOT / "models" / "digitnet.pt"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _few_threads():
    # CI has 2 cores; keep torch from oversubscribing them when workers run too.
    torch.set_num_threads(2)
    yield


@pytest.fixture
def digitnet_path() -> Path:
    assert DIGITNET.exists(), "models/digitnet.pt is missing: run python models/train_digitnet.py"
    return DIGITNET
