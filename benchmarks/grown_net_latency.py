"""ONNX Runtime (CPU) latency of whole grown networks against plain networks of the same widths
(issue 12 part 5): ViT-B/16 with its last MLP widened by 768, EfficientNet-B0 with its last
expansion conv widened.

Both files come from the real pipeline (``onnx_latency.checkpoint``: trace, apply_steps, a
100-class head, γ ~ U(5, 15); then ``export_checkpoint`` with the default passes, verified against
PyTorch after export and after every pass):
  folded — grown with GrowNorm, all passes (what ``surgeon export`` writes);
  plain  — the same growth without GrowNorm, all passes: after merge-parallel an ordinary network
           of the grown widths (ViT: one 768 → 3840 MLP Linear), the cost floor.
Sessions alternate A B, B A (``onnx_latency.interleaved_medians``); reported: folded ÷ plain
(target ≤ 1.03) and, from ONNX Runtime's profiler in a separate session, how much of the folded
model's node time is GrowNorm's inlined function.

    python benchmarks/grown_net_latency.py [--cases vit effnet] [--rounds 11] [--batches 1 8] [--json out.json]
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from onnx_latency import checkpoint, interleaved_medians, latency_parser, session  # sibling scripts (benchmarks/ is on sys.path)
from token_mlp_latency import grownorm_share

from surgeon.export.onnx_export import export_checkpoint

# name -> (label, architecture, layer, units)
CASES = {
    "vit": ("ViT-B/16 last MLP encoder_layer_11.mlp.0 +768", "torchvision:vit_b_16",
            "encoder.layers.encoder_layer_11.mlp.0", 768),
    "effnet": ("EfficientNet-B0 last expansion features.7.0.block.0.0 +1152", "torchvision:efficientnet_b0",
               "features.7.0.block.0.0", 1152),
}


def main() -> None:
    ap = latency_parser(__doc__, 11, [1, 8])
    ap.add_argument("--cases", nargs="+", choices=list(CASES), default=["vit"])
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        for name in args.cases:
            label, arch, layer, units = CASES[name]
            t0 = time.perf_counter()
            files, ops = {}, {}
            for side, norm in (("folded", True), ("plain", False)):
                result = export_checkpoint(checkpoint(d / f"{side}.pt", arch, layer, units, norm=norm), d / f"{side}.onnx")
                files[side], ops[side] = result.path, result.ops_after
                worst = max(c.rel_err for c in result.verifications)
                print(f"{label} / {side}: {sum(result.ops_after.values())} nodes, GrowNorm nodes {result.grownorm_nodes}, "
                      f"verified {len(result.verifications)}x (worst {worst:.1e})", flush=True)
            changed = {k: ops["folded"].get(k, 0) - ops["plain"].get(k, 0) for k in set(ops["folded"]) | set(ops["plain"])}
            print(f"  ops folded - plain: {dict(sorted((k, v) for k, v in changed.items() if v))} "
                  f"(exported in {time.perf_counter() - t0:.0f} s)", flush=True)
            sessions = {k: session(p, args.threads) for k, p in files.items()}
            for batch in args.batches:
                x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224), dtype=np.float32)
                med = interleaved_medians(sessions, x, args.rounds, reps=max(1, 4 // batch))
                norm_ms, nodes_ms = grownorm_share(str(files["folded"]), x, args.threads, runs=3)
                row = {"case": label, "batch": batch, **{f"{k}_ms": 1e3 * v for k, v in med.items()},
                       "folded_over_plain": med["folded"] / med["plain"],
                       "folded_grownorm_ms": norm_ms, "folded_nodes_ms": nodes_ms}
                rows.append(row)
                print(f"  batch {batch:>2}: folded {1e3 * med['folded']:8.1f} ms  plain {1e3 * med['plain']:8.1f} ms  "
                      f"folded/plain {row['folded_over_plain']:.3f}   GrowNorm {norm_ms:.2f} of {nodes_ms:.1f} ms in nodes "
                      f"({100 * norm_ms / nodes_ms:.1f}%)", flush=True)
            del sessions
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": args.threads, "ort": ort.__version__, "results": rows}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
