"""What both examples share: a small transfer task that needs no download, and the check that the
exported ONNX file answers like the PyTorch model.

The task: scikit-learn's 8x8 digits 5-9 (bundled with the package), upscaled to the 32x32 RGB inputs
of surgeon's shipped DigitNet, which was pretrained on digits 0-4.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

CLASSES = [str(d) for d in range(5, 10)]
MEAN, STD = 0.25, 0.35  # DigitNet's preprocessing (surgeon:digitnet records the same)


def arguments(doc: str, output_dir: str) -> argparse.ArgumentParser:
    """The options both examples take (CI runs them with ``--epochs 1 -b 8 --limit 64``)."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("-b", "--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.01, help="base learning rate (new units, γ and head: 10x)")
    p.add_argument("--units", type=int, default=128, help="new units in fc7")
    p.add_argument("--limit", type=int, default=None, help="use at most this many training (and val) images")
    p.add_argument("--output-dir", type=Path, default=Path(output_dir))
    return p


def digit_loaders(batch_size: int, train_fraction: float = 0.5, limit: int | None = None,
                  seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """Train and validation loaders of ``(images [N, 3, 32, 32], labels)`` for digits 5-9."""
    from sklearn.datasets import load_digits

    d = load_digits()
    keep = np.flatnonzero(d.target >= 5)
    images = torch.from_numpy(d.images[keep] / 16.0).float()[:, None]          # [N, 1, 8, 8] in 0..1
    images = F.interpolate(images, size=32, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    images = (images - MEAN) / STD
    labels = torch.from_numpy(d.target[keep] - 5).long()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_train = int(train_fraction * len(order))
    train, val = order[:n_train], order[n_train:]
    if limit:
        train, val = train[:limit], val[:limit]
    return (DataLoader(TensorDataset(images[train], labels[train]), batch_size=batch_size, shuffle=True),
            DataLoader(TensorDataset(images[val], labels[val]), batch_size=256))


@torch.no_grad()
def accuracy(model: torch.nn.Module, loader: DataLoader) -> float:
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    return correct / max(total, 1)


@torch.no_grad()
def onnx_matches_torch(onnx_path, model: torch.nn.Module, images: torch.Tensor) -> float:
    """Largest |ONNX Runtime - PyTorch| logit difference on ``images`` (the model in eval mode)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {session.get_inputs()[0].name: images.numpy()})
    model.eval()
    return float((torch.from_numpy(logits) - model(images)).abs().max())
