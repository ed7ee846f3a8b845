"""ONNX Runtime (CPU) latency of a grown token MLP shaped like ViT-B/16's last encoder MLP, A/B
interleaved in one process (issue 12 part 5's ViT case, built by hand while ViT growth lands).

    grown    — old Linear(768, 3072) and new Linear(768, 768) on the same [N, 197, 768] tokens,
               concatenated on the last axis → GELU → GrowNorm((3072, 768), axis=-1, γ ~ U(5, 15))
               → Linear(3840, 768): a widened MLP as growth builds it;
    plain    — Linear(768, 3840) → GELU → Linear(3840, 768): the same widths, no growth.

Both go through surgeon's export path (``to_onnx``, then the default passes — cleanup, fold-gamma,
merge-parallel — verified against PyTorch after export and after every pass that changed the graph,
at 1e-4 of the output's scale). ``unfolded`` is the grown model with cleanup only (``--no-fold``).
The images input ([N, 3, 225, 225]) becomes the tokens by a slice and a reshape (a copy of 0.6 MB
per image, the same in every model), so the timings are the MLP's. Reported: grown (folded) ÷
plain (target ≤ 1.03) and unfolded ÷ folded, medians over rounds alternating A B, B A, and (from
ONNX Runtime's profiler, a separate session) how much of the folded model's node time is GrowNorm's
inlined function.

    python benchmarks/token_mlp_latency.py [--rounds 21] [--batches 1 8] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from onnx_latency import interleaved_medians, latency_parser, session  # the sibling script (benchmarks/ is on sys.path)

from surgeon.export.onnx_export import BatchRange, op_counts, to_onnx
from surgeon.export.passes import PassManager, default_passes
from surgeon.export.verify import FP32_TOLERANCE, torch_reference, verify
from surgeon.grow.grownorm import GrowNorm
from surgeon.preprocessing import Preprocessing

TOKENS, HIDDEN, MLP, NEW = 197, 768, 3072, 768
SIZE = 225  # 3·225² = 151875 ≥ 197·768 = 151296 values per image


def tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1)[:, :TOKENS * HIDDEN].reshape(-1, TOKENS, HIDDEN)


class GrownMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.old, self.new = nn.Linear(HIDDEN, MLP), nn.Linear(HIDDEN, NEW)
        self.act = nn.GELU()
        self.norm = GrowNorm((MLP, NEW), axis=-1)
        self.fc2 = nn.Linear(MLP + NEW, HIDDEN)

    def forward(self, x):
        t = tokens(x)
        return self.fc2(self.norm(self.act(torch.cat([self.old(t), self.new(t)], -1))))


class PlainMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(HIDDEN, MLP + NEW), nn.GELU(), nn.Linear(MLP + NEW, HIDDEN)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(tokens(x))))


def export(model: nn.Module, manager: PassManager) -> tuple[bytes, dict, dict, list[str]]:
    """surgeon's export path in memory: export, verify, passes verified after each change."""
    model = model.eval()
    lean = to_onnx(model, SIZE, batch=BatchRange(1, 8, 8))
    reference = torch_reference(model, Preprocessing(input_size=SIZE, resize=SIZE), batches=(1, 5))
    verify(lean, reference, stage="export", tolerance=FP32_TOLERANCE)
    before, stages = op_counts(lean), []

    def after(name, candidate):
        checks = verify(candidate, reference, stage=name, tolerance=FP32_TOLERANCE)
        stages.append(f"{name} ({max(c.rel_err for c in checks):.1e})")

    lean, _ = manager.run(lean, after_each=after)
    return lean.to_proto().SerializeToString(), before, op_counts(lean), stages



def grownorm_share(model: bytes, x: np.ndarray, threads: int, runs: int = 5) -> tuple[float, float]:
    """(ms per run in GrowNorm's inlined function nodes, ms per run in all nodes), from ORT's profiler."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.enable_profiling = True
    opts.profile_file_prefix = str(Path(tempfile.gettempdir()) / "token_mlp_profile")
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    sess.run(None, {"images": x})
    for _ in range(runs):
        sess.run(None, {"images": x})
    trace = Path(sess.end_profiling())
    events = [e for e in json.loads(trace.read_text()) if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    trace.unlink()
    total = sum(e["dur"] for e in events) / 1e3 / (runs + 1)
    norm = sum(e["dur"] for e in events if "GrowNorm" in e["name"]) / 1e3 / (runs + 1)
    return norm, total


def main() -> None:
    args = latency_parser(__doc__, 21, [1, 8]).parse_args()
    torch.manual_seed(0)
    grown = GrownMLP()
    with torch.no_grad():
        grown.norm.gamma.uniform_(5.0, 15.0)
    torch.manual_seed(0)
    plain = PlainMLP()
    models = {}
    for name, model, manager in (("folded", grown, default_passes(True)), ("unfolded", grown, default_passes(False)),
                                 ("plain", plain, default_passes(True))):
        proto, before, after, stages = export(model, manager)
        models[name] = proto
        print(f"{name:<9} ops {before} -> {after}; verified after {', '.join(stages) or 'export only'}", flush=True)
    sessions = {k: session(v, args.threads) for k, v in models.items()}
    rows = []
    for batch in args.batches:
        x = np.random.default_rng(0).standard_normal((batch, 3, SIZE, SIZE), dtype=np.float32)
        med = interleaved_medians(sessions, x, args.rounds, reps=max(1, 8 // batch))
        row = {"case": "ViT-B/16 last MLP 3072+768, 197 tokens", "batch": batch,
               **{f"{k}_ms": 1e3 * v for k, v in med.items()},
               "folded_over_plain": med["folded"] / med["plain"],
               "unfolded_over_folded": med["unfolded"] / med["folded"]}
        norm_ms, nodes_ms = grownorm_share(models["folded"], x, args.threads)
        row["folded_grownorm_ms"], row["folded_nodes_ms"] = norm_ms, nodes_ms
        rows.append(row)
        print(f"token MLP 768→3072+768→768, 197 tokens, batch {batch}: folded {1e3 * med['folded']:8.2f} ms  "
              f"plain {1e3 * med['plain']:8.2f} ms  unfolded {1e3 * med['unfolded']:8.2f} ms   "
              f"folded/plain {row['folded_over_plain']:.3f}  unfolded/folded {row['unfolded_over_folded']:.3f}\n"
              f"    profile of folded: GrowNorm's function nodes {norm_ms:.2f} ms of {nodes_ms:.2f} ms in nodes "
              f"({100 * norm_ms / nodes_ms:.0f}%)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": args.threads, "ort": ort.__version__, "results": rows}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
