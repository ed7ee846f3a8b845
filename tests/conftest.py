"""Shared fixtures. Tests run on the CPU; ``gpu`` tests skip without CUDA."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

try:
    import torch
except ImportError:  # the deploy-only virtualenv (`make test` runs tests/deploy there): no PyTorch
    torch = None

ROOT = Path(__file__).resolve().parents[1]
DIGITNET = ROOT / "models" / "digitnet.pt"


def pytest_collection_modifyitems(config, items):
    if torch is not None and torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# CI has 2 cores: one torch thread per pytest-xdist worker, two when the suite runs in one process.
THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2


@pytest.fixture(autouse=True)
def _few_threads():
    if torch is not None:
        torch.set_num_threads(THREADS)
    yield


@pytest.fixture
def digitnet_path() -> Path:
    assert DIGITNET.exists(), "models/digitnet.pt is missing: run python models/train_digitnet.py"
    return DIGITNET
