"""``surgeon analyze``: what the old and new units of a grown model do, as an HTML report."""

from __future__ import annotations

import click

from surgeon.commands.common import CONTEXT, friendly_errors


@click.command("analyze", context_settings=CONTEXT)
@click.argument("checkpoint", metavar="GROWN.pt")
@click.option("--data", "data_spec", required=True,
              help="Validation data: an ImageFolder DIR (DIR/val, or DIR/<class>/ split by --val-split), "
                   "builtin:NAME or torchvision:NAME.")
@click.option("-o", "--output-dir", default="report", show_default=True, type=click.Path(file_okay=False),
              help="Folder for index.html, metrics.json and the PNG figures.")
@click.option("--units", type=click.IntRange(min=1), default=4, show_default=True,
              help="Old and new units (highest mean activation) whose top images are shown.")
@click.option("--max-images", type=click.IntRange(min=2), default=1000, show_default=True,
              help="Validation images evaluated (a fixed-seed subset when there are more).")
@click.option("-b", "--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("-j", "--workers", type=click.IntRange(min=0), default=0, show_default=True,
              help="Data-loading worker processes.")
@click.option("--device", default="cpu", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--val-split", type=float, default=None,
              help="Validation fraction when --data is a single folder [default: the one fine-tuning used, else 0.2].")
@click.option("--data-root", default=None, help="Download folder for torchvision:NAME data sets.")
@click.option("--trust-code", is_flag=True, help="Allow importing the user code the checkpoint was grown from.")
@friendly_errors
def analyze(checkpoint: str, data_spec: str, output_dir: str, units: int, max_images: int, batch_size: int,
            workers: int, device: str, val_split: float | None, data_root: str | None, trust_code: bool) -> None:
    """Analyze the grown units of GROWN.pt on the validation split of --data: accuracy with old, new
    and both unit groups and of linear probes on each, γ and activation-norm distributions, γ during
    fine-tuning, 2-D embeddings of the features, and the images that activate the top units most.
    Writes index.html (figures alongside), metrics.json and PNGs to --output-dir.

    \b
    Example:
      surgeon finetune --model surgeon:digitnet --data builtin:digits-target \\
          --grow wide --layer classifier.3 --units 128 --output-dir runs/wide
      surgeon analyze runs/wide/grown.pt --data builtin:digits-target -o runs/wide/report
    """
    from surgeon.analyze.report import write_report
    from surgeon.analyze.units import analyze_model, check_classes, grow_norms
    from surgeon.checkpoint import read_checkpoint
    from surgeon.train.data import load_data
    from surgeon.train.finetune import resolve_device

    ckpt = read_checkpoint(checkpoint)
    model = ckpt.build_model(trust_code=trust_code)
    grow_norms(model)  # "nothing to analyze" before any data is read
    # A single image folder is split as fine-tuning split it, so the analysis sees held-out images.
    split = val_split if val_split is not None else float(ckpt.train_args.get("val_split", 0.2))
    data = load_data(data_spec, ckpt.preprocessing, val_split=split, augment=False,
                     seed=int(ckpt.train_args.get("seed", 0)), root=data_root)
    check_classes(data.classes, ckpt.classes, data_spec)
    result = analyze_model(model, data.val, history=ckpt.history, max_images=max_images, units=units,
                           batch_size=batch_size, workers=workers, device=resolve_device(device))
    result = {"checkpoint": str(checkpoint), "data": data_spec, "classes": list(ckpt.classes), **result}
    index = write_report(result, output_dir, dataset=data.val, classes=list(ckpt.classes),
                         preprocessing=ckpt.preprocessing)
    for name, info in result["layers"].items():
        acc = info["accuracy"]
        split = "  ".join(f"{k.replace('_', ' ')} {100 * v:.2f}%" for k, v in acc.items())
        click.echo(f"{name} ({info['kind']}, groups {tuple(info['groups'])}): {split}")
    click.echo(f"wrote {index} ({result['images']} images)")
