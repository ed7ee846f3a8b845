"""SURGEON_MODELS points an installed surgeon (e.g. the Docker image) at its copy of models/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_surgeon_models_env_moves_the_shipped_weights(tmp_path):
    code = "from surgeon.zoo import SHIPPED_WEIGHTS; print(SHIPPED_WEIGHTS['digitnet'])"
    out = subprocess.run([sys.executable, "-c", code], env={"SURGEON_MODELS": str(tmp_path), "PATH": ""},
                         capture_output=True, text=True, check=True).stdout.strip()
    assert Path(out) == tmp_path / "digitnet.pt"
    default = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert Path(default) == Path(__file__).resolve().parents[2] / "models" / "digitnet.pt" and Path(default).is_file()
