"""`surgeon bench` on ONNX Runtime (CPU): the folded ONNX of a grown model vs the same model in
PyTorch eager (its grown.pt), batch 1 and 32, interleaved in one process.

Models: ResNet18 with layer4.1.conv1 widened by 64 (conv-level growth) and VGG11 with classifier.3
(fc7) widened by 1024 (fc-level growth), random weights (timing does not depend on them).

    python benchmarks/runtime_vs_eager.py [--iters 30] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from click.testing import CliRunner

from surgeon.checkpoint import Checkpoint, save_checkpoint
from surgeon.cli import cli
from surgeon.grow.analysis import trace
from surgeon.grow.ops import GrowthState, apply_steps
from surgeon.grow.recipe import GrowStep, HeadStep
from surgeon.preprocessing import Preprocessing
from surgeon.zoo import build_architecture

CASES = [("resnet18 layer4.1.conv1 +64", "torchvision:resnet18", "layer4.1.conv1", 64),
         ("vgg11 classifier.3 +1024", "torchvision:vgg11", "classifier.3", 1024)]


def grown_checkpoint(path: Path, arch: str, layer: str, units: int) -> Path:
    torch.manual_seed(0)
    gm = trace(build_architecture(arch))
    steps = [HeadStep(100), GrowStep("wide", layer, units, gamma_init=10.0)]
    apply_steps(gm, steps, GrowthState(224))
    return save_checkpoint(path, Checkpoint(arch, "none", steps, [str(i) for i in range(100)], Preprocessing(), gm.state_dict()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, arch, layer, units in CASES:
            d = Path(tmp) / arch.split(":")[1]
            ckpt = grown_checkpoint(d / "grown.pt", arch, layer, units)
            runner = CliRunner()
            res = runner.invoke(cli, ["export", str(ckpt), "-o", str(d / "model.onnx")])
            assert res.exit_code == 0, res.output
            res = runner.invoke(cli, ["bench", str(d / "model.onnx"), "--vs", str(ckpt), "--batch", "1,32",
                                      "--iters", str(args.iters), "--json", str(d / "bench.json")])
            assert res.exit_code == 0, res.output
            print(label)
            print(res.output)
            results[label] = json.loads((d / "bench.json").read_text())
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
