"""The resumable training state (``checkpoint.pt``): model, optimizer, schedule, RNG, history.

Written atomically after every epoch; ``--resume`` continues from it to exactly the result an
uninterrupted run with the same seed reaches. Like ``grown.pt`` it holds only tensors and plain
data, so ``torch.load(weights_only=True)`` reads it.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from surgeon.checkpoint import read_raw
from surgeon.errors import CheckpointError
from surgeon.fileio import atomic_write

STATE_FORMAT = "surgeon.train-state"
STATE_VERSION = 1


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": list(random.getstate()[1]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_train_state(path: str | Path, data: dict[str, Any]) -> Path:
    payload = {"format": STATE_FORMAT, "format_version": STATE_VERSION, **data}
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_train_state(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        p = p / "checkpoint.pt"
    raw = read_raw(p)
    if not isinstance(raw, dict) or raw.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{p} is not a surgeon training state (pass the checkpoint.pt of an --output-dir to --resume)")
    if raw.get("format_version", 0) > STATE_VERSION:
        raise CheckpointError(f"{p} was written by a newer surgeon (state version {raw.get('format_version')})")
    return raw
