"""Training-step time of a grown model vs the same widened model without GrowNorm (CPU).

Both models have identical structure and widths except for the GrowNorm ops; steps alternate
A/B/A/B in one process and the ratio of medians is reported (target ≤ 1.05). Where a model sits in
memory changes its speed by several percent on a CPU (seen here: the first of two *identical*
VGG11s built was 5-10 % slower), so each side is built twice, in the order A B B A, and all four
models are timed round-robin.

    python benchmarks/train_step.py [--rounds 15] [--steps 5] [--cases vit effnet ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from surgeon.grow.analysis import trace
from surgeon.grow.ops import GrowthState, apply_steps
from surgeon.grow.recipe import GrowStep, HeadStep
from surgeon.zoo import build_architecture

CASES = {
    # name: (label, architecture, layer, units, input size, batch)
    "digitnet-fc7": ("digitnet fc7 +128", "surgeon:digitnet", "classifier.3", 128, 32, 64),
    "digitnet-conv": ("digitnet conv features.8 +32", "surgeon:digitnet", "features.8", 32, 32, 64),
    "resnet18": ("resnet18 layer4.1.conv1 +64", "torchvision:resnet18", "layer4.1.conv1", 64, 224, 8),
    "vgg11": ("vgg11 classifier.3 (fc7) +1024", "torchvision:vgg11", "classifier.3", 1024, 64, 16),
    # issue 12 part 5 (not run by default: minutes each on a 2-core CPU)
    "vit": ("vit_b_16 encoder_layer_11.mlp.0 +768", "torchvision:vit_b_16", "encoder.layers.encoder_layer_11.mlp.0",
            768, 224, 4),
    "effnet": ("efficientnet_b0 features.7.0.block.0.0 +1152", "torchvision:efficientnet_b0",
               "features.7.0.block.0.0", 1152, 224, 8),
}
DEFAULT_CASES = ["digitnet-fc7", "digitnet-conv", "resnet18", "vgg11"]


def grown(arch: str, layer: str, units: int, size: int, norm: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    gm = trace(build_architecture(arch))
    apply_steps(gm, [HeadStep(10), GrowStep("wide", layer, units, norm=norm, gamma_init=10.0)], GrowthState(size))
    return gm.train()


def step_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def timed(step, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--cases", nargs="+", choices=list(CASES), default=DEFAULT_CASES)
    ap.add_argument("--steps", type=int, default=5, help="steps per timed block")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--flush-denormal", action="store_true", help="flush denormal floats to zero (CPU)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.flush_denormal:
        torch.set_flush_denormal(True)
    results = []
    for label, arch, layer, units, size, batch in (CASES[c] for c in args.cases):
        x = torch.randn(batch, 3, size, size)
        y = torch.randint(0, 10, (batch,))
        a1 = step_fn(grown(arch, layer, units, size, norm=True), x, y)
        b1 = step_fn(grown(arch, layer, units, size, norm=False), x, y)
        b2 = step_fn(grown(arch, layer, units, size, norm=False), x, y)
        a2 = step_fn(grown(arch, layer, units, size, norm=True), x, y)
        for f in (a1, b1, b2, a2):  # warm-up
            timed(f, 2)
        ta, tb = [], []
        for r in range(args.rounds):  # interleaved: drift on a shared machine hits both alike
            order = [(a1, ta), (b1, tb), (b2, tb), (a2, ta)]
            for f, times in order if r % 2 == 0 else order[::-1]:
                times.append(timed(f, args.steps))
        ma, mb = statistics.median(ta), statistics.median(tb)
        # Per-round paired ratios show the noise floor of this machine next to the ratio of medians.
        paired = sorted((ta[2 * i] + ta[2 * i + 1]) / (tb[2 * i] + tb[2 * i + 1]) for i in range(args.rounds))
        q1, q3 = paired[len(paired) // 4], paired[(3 * len(paired)) // 4]
        row = {"case": label, "batch": batch, "input": size, "grownorm_ms": 1e3 * ma, "no_grownorm_ms": 1e3 * mb,
               "ratio": ma / mb, "paired_ratio_q1": q1, "paired_ratio_q3": q3}
        results.append(row)
        print(f"{label:<34} batch {batch:>3}  with GrowNorm {1e3 * ma:8.2f} ms  without {1e3 * mb:8.2f} ms  "
              f"ratio {ma / mb:.3f}  (paired rounds IQR {q1:.3f}-{q3:.3f})", flush=True)
    if args.json:
        meta = {"machine": platform.processor() or platform.machine(), "threads": args.threads, "torch": torch.__version__}
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
