"""What the deploy-only tests read, made with PyTorch in the main virtualenv:

    python -m tests.deploy.fixtures build/deploy-fixtures     # `make test` runs this before them

A grown DigitNet exported twice (folded, and --no-fold so the GrowNorm function stays), two photos,
and PyTorch's reference for them: torchvision's eval transform of each photo and the checkpoint's
logits in PyTorch eager. The deploy virtualenv (no torch) then checks that it reproduces both.
Made fresh by every run (never committed), so the tests always see what the current exporter writes.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np

PHOTOS = ("china.jpg", "flower.jpg")  # scikit-learn's sample photos (427x640 RGB JPEGs)


def make(out: Path) -> Path:
    import sklearn
    import torch
    from torchvision import transforms as T

    import surgeon
    from surgeon.export.onnx_export import export_checkpoint
    from surgeon.grow.recipe import GrowStep
    from surgeon.imageio import open_image
    from tests.export.test_onnx_export import _grown_checkpoint

    out.mkdir(parents=True, exist_ok=True)
    ckpt = _grown_checkpoint(out / "grown.pt", [GrowStep("wide", "classifier.0", 32), GrowStep("wide", "features.8", 8)])
    export_checkpoint(ckpt, out / "model.onnx")
    export_checkpoint(ckpt, out / "model-nofold.onnx", fold=False)
    (out / "photos").mkdir(exist_ok=True)
    pre = surgeon.load(ckpt).surgeon_checkpoint.preprocessing
    reference = T.Compose([T.Resize(pre.resize), T.CenterCrop(pre.input_size), T.ToTensor(), T.Normalize(pre.mean, pre.std)])
    inputs = []
    for name in PHOTOS:
        shutil.copyfile(Path(sklearn.__file__).parent / "datasets" / "images" / name, out / "photos" / name)
        inputs.append(reference(open_image(out / "photos" / name)))
    batch = torch.stack(inputs)
    with torch.no_grad():
        logits = surgeon.load(ckpt)(batch)
    np.savez(out / "reference.npz", inputs=batch.numpy(), logits=logits.numpy())
    (out / "photos.json").write_text(json.dumps(list(PHOTOS)))
    return out


if __name__ == "__main__":
    print(f"wrote {make(Path(sys.argv[1] if len(sys.argv) > 1 else 'build/deploy-fixtures'))}")
