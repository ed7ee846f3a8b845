"""``surgeon demo``: the offline end-to-end example — grow the shipped DigitNet and compare."""

from __future__ import annotations

from pathlib import Path

import click

from surgeon.commands.common import CONTEXT, friendly_errors

DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "models" / "digitnet.pt"


@click.command("demo", context_settings=CONTEXT)
@click.option("--model", "model_spec", type=click.Path(dir_okay=False), default=str(DEFAULT_MODEL), show_default=True,
              help="Base model (pretrained on builtin:digits-source).")
@click.option("--data", default="builtin:digits-target", show_default=True)
@click.option("--layer", default="classifier.3", show_default=True, help="Layer to widen (fc7 of DigitNet).")
@click.option("--units", type=int, default=128, show_default=True)
@click.option("--deep/--no-deep", default=False, show_default=True, help="Also run deep growth after --layer.")
@click.option("--epochs", type=int, default=15, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("-j", "--workers", type=int, default=0, show_default=True)
@click.option("--output-dir", type=click.Path(file_okay=False), default="runs/demo", show_default=True)
@friendly_errors
def demo(model_spec: str, data: str, layer: str, units: int, deep: bool, epochs: int, seed: int, workers: int,
         output_dir: str) -> None:
    """Fine-tune the shipped DigitNet (pretrained on digits 0-4) on digits 5-9 twice — plain
    fine-tuning (baseline) and with fc7 widened by GrowNorm'd new units — and print both accuracies.

    \b
    Example:
      surgeon demo --epochs 15 --output-dir runs/demo
    """
    from surgeon.grow.recipe import GrowStep
    from surgeon.train.config import FinetuneConfig
    from surgeon.train.finetune import finetune

    out = Path(output_dir)
    runs = {"baseline": ([], True), f"wide {layer} +{units}": ([GrowStep("wide", layer, units)], False)}
    if deep:
        runs[f"deep after {layer} +{units}"] = ([GrowStep("deep", layer, units)], False)
    results = {}
    for i, (name, (steps, baseline)) in enumerate(runs.items()):
        click.echo(f"[{i + 1}/{len(runs)}] {name}")
        config = FinetuneConfig(model=model_spec, data=data, grow=steps, baseline=baseline, epochs=epochs,
                                seed=seed, workers=workers, device="cpu",
                                output_dir=str(out / name.split()[0]))
        results[name] = finetune(config, progress=True)
    click.echo("")
    click.echo(f"{'run':<32} {'final val acc':>14} {'best val acc':>13}")
    for name, r in results.items():
        click.echo(f"{name:<32} {100 * r.final_acc:>13.2f}% {100 * r.best_acc:>12.2f}%")
    click.echo(f"checkpoints and curves in {out}/")
