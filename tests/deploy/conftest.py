"""The deploy tests run twice: in the main virtualenv (fixtures made on the spot with PyTorch) and in
the deploy-only one, `.venv-deploy` (no PyTorch: `make test` makes the fixtures first in the main
virtualenv and names their folder in SURGEON_DEPLOY_FIXTURES)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

HAS_TORCH = importlib.util.find_spec("torch") is not None


@pytest.fixture(scope="session")
def fixtures(tmp_path_factory) -> Path:
    given = os.environ.get("SURGEON_DEPLOY_FIXTURES")
    if given:
        path = Path(given)
        assert (path / "reference.npz").is_file(), f"{path} holds no deploy fixtures: run python -m tests.deploy.fixtures {path}"
        return path
    if not HAS_TORCH:
        pytest.fail("no PyTorch here and no SURGEON_DEPLOY_FIXTURES: make them in the main virtualenv with "
                    "python -m tests.deploy.fixtures DIR (make test does)")
    from tests.deploy.fixtures import make

    return make(tmp_path_factory.mktemp("deploy"))
