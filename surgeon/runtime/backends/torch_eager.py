"""PyTorch eager: a ``grown.pt`` rebuilt with :func:`surgeon.load` (CUDA if present, else CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


class TorchRunner:
    """Eval-mode model under ``torch.inference_mode``; forward passes may run from several threads."""

    def __init__(self, path: Path, device: str | None = None, trust_code: bool = False):
        import torch

        from surgeon.checkpoint import read_checkpoint

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = read_checkpoint(path).build_model(trust_code=trust_code, share_weights=True).to(self.device).eval()
        self.backend = "torch"

    def run(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out = self.model(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device))
        return out.float().cpu().numpy()
