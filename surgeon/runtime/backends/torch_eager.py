"""PyTorch eager: a ``grown.pt`` rebuilt with :func:`surgeon.load` (CUDA if present, else CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _torch(what: str):
    try:
        import torch
    except ImportError as exc:
        from surgeon.errors import missing_extra

        raise (missing_extra(exc, what) or exc) from None
    return torch


def read_checkpoint_info(path: Path):
    """What a ``grown.pt`` says about itself: (classes, preprocessing, base model spec)."""
    _torch(f"reading the checkpoint {path.name}")
    from surgeon.checkpoint import read_checkpoint

    ckpt = read_checkpoint(path)
    return list(ckpt.classes), ckpt.preprocessing, ckpt.model


class TorchRunner:
    """Eval-mode model under ``torch.inference_mode``; forward passes may run from several threads."""

    def __init__(self, path: Path, device: str | None = None, trust_code: bool = False):
        torch = _torch(f"the torch backend ({path.name})")

        from surgeon.checkpoint import read_checkpoint

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = read_checkpoint(path).build_model(trust_code=trust_code, share_weights=True).to(self.device).eval()
        self.backend = "torch"

    def run(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out = self.model(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device))
        return out.float().cpu().numpy()
