"""Demo accuracies over seeds: plain fine-tuning vs wide- and deep-grown DigitNet on digits 5-9.

    python benchmarks/demo_seeds.py [--seeds 0 1 2] [--epochs 15] [--out runs/demo-seeds] [--json out.json]

Prints a markdown table (mean ± std of the final validation accuracy over the seeds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from surgeon.grow.recipe import GrowStep
from surgeon.train.config import FinetuneConfig
from surgeon.train.finetune import finetune

ROOT = Path(__file__).resolve().parents[1]

RUNS: dict[str, dict] = {
    "baseline (plain fine-tuning)": {"baseline": True},
    "wide fc7 +128, GrowNorm γ auto": {"grow": [GrowStep("wide", "classifier.3", 128)]},
    "wide fc7 +128, GrowNorm γ = 20": {"grow": [GrowStep("wide", "classifier.3", 128, gamma_init=20.0)]},
    "wide fc7 +128, no GrowNorm": {"grow": [GrowStep("wide", "classifier.3", 128, norm=False)]},
    "deep after fc7 +128, GrowNorm γ auto": {"grow": [GrowStep("deep", "classifier.3", 128)]},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--model", default=str(ROOT / "models" / "digitnet.pt"))
    ap.add_argument("--data", default="builtin:digits-target")
    ap.add_argument("--out", default="runs/demo-seeds")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    t0 = time.time()
    table: dict[str, list[float]] = {}
    for name, kw in RUNS.items():
        for seed in args.seeds:
            cfg = FinetuneConfig(model=args.model, data=args.data, epochs=args.epochs, seed=seed, workers=0,
                                 device="cpu", output_dir=f"{args.out}/{len(table)}-{seed}", **kw)
            acc = finetune(cfg, progress=False).final_acc
            table.setdefault(name, []).append(100 * acc)
            print(f"{name:<40} seed {seed}: {100 * acc:.2f}%", flush=True)
    print(f"\n| run | final val accuracy (%), mean ± std over seeds {args.seeds} |\n|---|---|")
    for name, accs in table.items():
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"| {name} | {statistics.mean(accs):.2f} ± {sd:.2f} |")
    print(f"\n{args.epochs} epochs each, {time.time() - t0:.0f} s in all")
    if args.json:
        Path(args.json).write_text(json.dumps({"epochs": args.epochs, "seeds": args.seeds, "accuracy": table}, indent=2))


if __name__ == "__main__":
    main()
