"""Grow a pretrained network and fine-tune it with PyTorch Lightning, then save and export it.

    pip install 'surgeon[lightning]'
    python examples/lightning_loop.py
    python examples/lightning_loop.py --epochs 1 -b 8 --limit 64

Lightning owns the loop (``train()``/``eval()``, devices, precision); surgeon supplies the grown
model, the paper's parameter groups (new units, γ and head at 10x the base rate) in
``configure_optimizers``, and the checkpoint and ONNX export afterwards.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F

import surgeon
from digits import CLASSES, arguments, digit_loaders, onnx_matches_torch


class Finetune(L.LightningModule):
    def __init__(self, model: torch.nn.Module, lr: float, epochs: int) -> None:
        super().__init__()
        self.model, self.lr, self.epochs = model, lr, epochs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        loss = F.cross_entropy(self.model(images), labels)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        self.log("val_acc", (self.model(images).argmax(1) == labels).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        groups = surgeon.param_groups(self.model, lr=self.lr, new_lr_mult=10, tune="all")
        optimizer = torch.optim.SGD(groups, momentum=0.9, weight_decay=5e-4)
        step = max(1, round(2 * self.epochs / 3))
        return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=step, gamma=0.1)]


def main(argv: list[str] | None = None) -> None:
    p = arguments(__doc__, "runs/lightning_loop")
    p.add_argument("--accelerator", default="auto", help="Lightning's: auto, cpu, gpu")
    args = p.parse_args(argv)
    L.seed_everything(0, verbose=False)
    train, val = digit_loaders(args.batch_size, limit=args.limit)

    model = surgeon.grow_model("surgeon:digitnet", [surgeon.Wide("classifier.3", args.units)],
                               classes=CLASSES, calib=train)
    task = Finetune(model, args.lr, args.epochs)
    trainer = L.Trainer(max_epochs=args.epochs, accelerator=args.accelerator, devices=1, logger=False,
                        enable_checkpointing=False, enable_model_summary=False, default_root_dir=args.output_dir)
    trainer.fit(task, train, val)
    print(f"val accuracy {100 * float(trainer.callback_metrics['val_acc']):.1f}%")

    args.output_dir.mkdir(parents=True, exist_ok=True)
    grown_pt = surgeon.save(task.model, args.output_dir / "grown.pt")   # the grown model inside the LightningModule
    result = surgeon.export_onnx(grown_pt, args.output_dir / "model.onnx")
    diff = onnx_matches_torch(result.path, task.model.cpu(), next(iter(val))[0][:16])
    print(f"wrote {grown_pt} and {result.path}; ONNX Runtime vs PyTorch: max |diff| {diff:.2e}")
    if diff > 1e-3:
        raise SystemExit(f"ONNX Runtime and PyTorch disagree by {diff}")


if __name__ == "__main__":
    main()
