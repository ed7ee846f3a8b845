"""Grow a pretrained network and fine-tune it in a plain PyTorch loop, then save and export it.

    python examples/plain_loop.py                      # the paper's WA-CNN on a small offline task
    python examples/plain_loop.py --epochs 1 -b 8 --limit 64

Widens fc7 (``classifier.3``) of surgeon's shipped DigitNet by ``--units`` new units (GrowNorm after
them, γ calibrated on the training data), trains new units, γ and the head at 10x the base learning
rate (the paper's protocol), saves ``grown.pt``, exports a verified ONNX file and checks ONNX Runtime
against PyTorch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import surgeon
from digits import CLASSES, accuracy, arguments, digit_loaders, onnx_matches_torch


def main(argv: list[str] | None = None) -> None:
    args = arguments(__doc__, "runs/plain_loop").parse_args(argv)
    torch.manual_seed(0)
    train, val = digit_loaders(args.batch_size, limit=args.limit)

    # Grow: a new head for the 5 classes, fc7 widened; γ "auto" is calibrated on training images.
    model = surgeon.grow_model("surgeon:digitnet", [surgeon.Wide("classifier.3", args.units)],
                               classes=CLASSES, calib=train)
    # The paper's groups: new units, γ and head at 10x lr, every pretrained layer at lr ("All" in the paper;
    # tune="top" trains only from fc7 up, tune="new" freezes the pretrained layers).
    optimizer = torch.optim.SGD(surgeon.param_groups(model, lr=args.lr, new_lr_mult=10, tune="all"),
                                momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, round(2 * args.epochs / 3)), gamma=0.1)
    print(f"before training: val accuracy {100 * accuracy(model, val):.1f}%")
    history = []
    for epoch in range(args.epochs):
        model.train()
        for images, labels in train:
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scheduler.step()
        history.append({"epoch": epoch + 1, "train_loss": loss.item(), "val_acc": accuracy(model, val)})
        print(f"epoch {epoch + 1}: loss {history[-1]['train_loss']:.3f}, val accuracy {100 * history[-1]['val_acc']:.1f}%")

    args.output_dir.mkdir(parents=True, exist_ok=True)
    grown_pt = surgeon.save(model, args.output_dir / "grown.pt", history=history)   # classes came with grow_model
    result = surgeon.export_onnx(grown_pt, args.output_dir / "model.onnx")        # verified before it is written
    diff = onnx_matches_torch(result.path, model, next(iter(val))[0][:16])
    print(f"wrote {grown_pt} and {result.path}; ONNX Runtime vs PyTorch: max |diff| {diff:.2e}")
    if diff > 1e-3:
        raise SystemExit(f"ONNX Runtime and PyTorch disagree by {diff}")


if __name__ == "__main__":
    main()
