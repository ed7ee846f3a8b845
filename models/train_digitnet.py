"""Train the demo base model: DigitNet on builtin:digits-source (digits 0-4), from scratch.

Reproducible on the CPU (fixed seed, single process, no workers):

    python models/train_digitnet.py            # writes models/digitnet.pt

It runs the same fine-tuning loop users run (``surgeon finetune``) with random initial weights, so
the result is an ordinary surgeon checkpoint that ``--model models/digitnet.pt`` grows.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import torch

from surgeon.train.config import FinetuneConfig
from surgeon.train.finetune import finetune

HERE = Path(__file__).resolve().parent


def main(out: Path = HERE / "digitnet.pt") -> None:
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        config = FinetuneConfig(
            model="surgeon:digitnet", weights="none", data="builtin:digits-source", output_dir=tmp,
            epochs=30, batch_size=32, lr=0.05, lr_new_mult=1.0, lr_step=20, workers=0, seed=0, device="cpu",
        )
        result = finetune(config, progress=False)
        shutil.copyfile(Path(tmp) / "grown.pt", out)
    print(f"val accuracy on digits 0-4: {100 * result.final_acc:.2f}% -> {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
