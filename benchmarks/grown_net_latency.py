"""ONNX Runtime (CPU) latency of whole grown networks against plain networks of the same widths
(issue 12 part 5): ViT-B/16 with its last MLP widened by 768, EfficientNet-B0 with its last
expansion conv widened; GoogLeNet and DenseNet-121 with a layer that feeds a concat widened.

Both files come from the real pipeline (``onnx_latency.checkpoint``: trace, apply_steps, a
100-class head, γ ~ U(5, 15); then ``export_checkpoint`` with the default passes, verified against
PyTorch after export and after every pass):
  folded — grown with GrowNorm, all passes (what ``surgeon export`` writes);
  plain  — the same growth without GrowNorm, all passes: after merge-parallel an ordinary network
           of the grown widths (ViT: one 768 → 3840 MLP Linear), the cost floor;
  native — where merge-parallel leaves the grown structure (EfficientNet-B0: the widened depthwise
           conv stays two grouped convs), also the architecture built at the grown widths
           (torchvision's EfficientNet-B0 with expand ratio 12 in its last block: 192 → 2304),
           same head, through the same export.
Two sessions per file (created A B B A), alternated A B, B A (``onnx_latency.interleaved_medians``),
each timed block about ``--block-s`` long, a side's time the mean of its sessions' medians; reported: folded ÷ plain
(target ≤ 1.03) and, from ONNX Runtime's profiler in a separate session, how much of the folded
model's node time is GrowNorm's inlined function.

    python benchmarks/grown_net_latency.py [--cases vit effnet googlenet densenet] [--rounds 11] [--batches 1 8] [--json out.json]
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from onnx_latency import checkpoint, latency_parser, sessions_twice, side_medians  # sibling scripts (benchmarks/ is on sys.path)
from token_mlp_latency import grownorm_share

from surgeon.checkpoint import Checkpoint, save_checkpoint
from surgeon.export.onnx_export import export_checkpoint
from surgeon.preprocessing import Preprocessing
from surgeon.zoo import build_architecture

CLASSES = 100  # onnx_latency.checkpoint's head


def wide_efficientnet_b0():
    """EfficientNet-B0 built at the grown widths: its last block expands 192 → 2304 (ratio 12, not 6)."""
    from torchvision.models.efficientnet import EfficientNet, _efficientnet_conf

    setting, last_channel = _efficientnet_conf("efficientnet_b0", width_mult=1.0, depth_mult=1.0)
    setting[-1].expand_ratio = 12
    return EfficientNet(setting, 0.2, last_channel=last_channel, num_classes=CLASSES)


def native_checkpoint(path: Path, factory: str) -> Path:
    torch.manual_seed(0)
    model = build_architecture(factory)
    save_checkpoint(path, Checkpoint(factory, "none", [], [str(i) for i in range(CLASSES)], Preprocessing(),
                                     model.state_dict()))
    return path


# name -> (label, architecture, layer, units, factory of the natively wide network or None)
CASES = {
    "vit": ("ViT-B/16 last MLP encoder_layer_11.mlp.0 +768", "torchvision:vit_b_16",
            "encoder.layers.encoder_layer_11.mlp.0", 768, None),
    "effnet": ("EfficientNet-B0 last expansion features.7.0.block.0.0 +1152", "torchvision:efficientnet_b0",
               "features.7.0.block.0.0", 1152, "grown_net_latency:wide_efficientnet_b0"),
    # Growth into a concat: γ does not fold through the slices and the concat yet, so this measures
    # what the GrowNorm that stays costs.
    "googlenet": ("GoogLeNet inception5b.branch1.conv +128 (into the concat)", "torchvision:googlenet",
                  "inception5b.branch1.conv", 128, None),
    "densenet": ("DenseNet-121 denseblock4.denselayer16.conv2 +32 (into the concat)", "torchvision:densenet121",
                 "features.denseblock4.denselayer16.conv2", 32, None),
}


def main() -> None:
    ap = latency_parser(__doc__, 11, [1, 8])
    ap.add_argument("--cases", nargs="+", choices=list(CASES), default=["vit"])
    ap.add_argument("--block-s", type=float, default=0.5, help="seconds per timed block (runs per block from a trial)")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        for name in args.cases:
            label, arch, layer, units, native = CASES[name]
            t0 = time.perf_counter()
            files, ops = {}, {}
            sides = [("folded", True), ("plain", False)] + ([("native", None)] if native else [])
            for side, norm in sides:
                ckpt = (native_checkpoint(d / f"{side}.pt", native) if norm is None
                        else checkpoint(d / f"{side}.pt", arch, layer, units, norm=norm))
                result = export_checkpoint(ckpt, d / f"{side}.onnx", trust_code=norm is None)
                files[side], ops[side] = result.path, result.ops_after
                worst = max(c.rel_err for c in result.verifications)
                print(f"{label} / {side}: {sum(result.ops_after.values())} nodes, GrowNorm nodes {result.grownorm_nodes}, "
                      f"verified {len(result.verifications)}x (worst {worst:.1e})", flush=True)
            changed = {k: ops["folded"].get(k, 0) - ops["plain"].get(k, 0) for k in set(ops["folded"]) | set(ops["plain"])}
            print(f"  ops folded - plain: {dict(sorted((k, v) for k, v in changed.items() if v))} "
                  f"(exported in {time.perf_counter() - t0:.0f} s)", flush=True)
            sessions = sessions_twice(files, args.threads)  # each side's time: the mean of its two sessions' medians
            for batch in args.batches:
                x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224), dtype=np.float32)
                med = side_medians(sessions, x, args.rounds, args.block_s)
                norm_ms, nodes_ms = grownorm_share(str(files["folded"]), x, args.threads, runs=3)
                row = {"case": label, "batch": batch, **{f"{k}_ms": 1e3 * v for k, v in med.items()},
                       **{f"folded_over_{k}": med["folded"] / med[k] for k in med if k != "folded"},
                       "folded_grownorm_ms": norm_ms, "folded_nodes_ms": nodes_ms}
                rows.append(row)
                times = "  ".join(f"{k} {1e3 * v:8.1f} ms" for k, v in med.items())
                ratios = "  ".join(f"folded/{k} {med['folded'] / med[k]:.3f}" for k in med if k != "folded")
                print(f"  batch {batch:>2}: {times}  {ratios}   GrowNorm {norm_ms:.2f} of {nodes_ms:.1f} ms in nodes "
                      f"({100 * norm_ms / nodes_ms:.1f}%)", flush=True)
            del sessions
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": args.threads, "ort": ort.__version__, "results": rows}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
