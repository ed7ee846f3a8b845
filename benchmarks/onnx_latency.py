"""ONNX Runtime (CPU) latency of exported grown models, A/B interleaved in one process.

For each case three files come from the same grown checkpoint pipeline:
  folded   — grown with GrowNorm, exported with all passes (what `surgeon export` writes);
  unfolded — the same model exported with `--no-fold` (cleanup only);
  plain    — the same widths grown *without* GrowNorm, exported with all passes: an ordinary
             network of the grown widths, the cost floor.
Reported: folded ÷ plain (target ≤ 1.03) and unfolded ÷ folded, at batch 1 and 32.

    python benchmarks/onnx_latency.py [--rounds 15] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from surgeon.checkpoint import Checkpoint, save_checkpoint
from surgeon.export.onnx_export import export_checkpoint
from surgeon.grow.analysis import trace
from surgeon.grow.grownorm import GrowNorm
from surgeon.grow.ops import GrowthState, apply_steps
from surgeon.grow.recipe import GrowStep, HeadStep
from surgeon.onnxrt import session_options
from surgeon.preprocessing import Preprocessing
from surgeon.zoo import build_architecture

CASES = [
    ("resnet18 layer4.1.conv1 +64 (conv-level)", "torchvision:resnet18", "layer4.1.conv1", 64),
    ("vgg11 classifier.3 +1024 (fc-level)", "torchvision:vgg11", "classifier.3", 1024),
]


def checkpoint(path: Path, arch: str, layer: str, units: int, norm: bool) -> Path:
    torch.manual_seed(0)
    gm = trace(build_architecture(arch))
    steps = [HeadStep(100), GrowStep("wide", layer, units, norm=norm, gamma_init=10.0)]
    apply_steps(gm, steps, GrowthState(224))
    with torch.no_grad():
        for m in gm.modules():
            if isinstance(m, GrowNorm):
                m.gamma.uniform_(5.0, 15.0)
    save_checkpoint(path, Checkpoint(arch, "none", steps, [str(i) for i in range(100)], Preprocessing(), gm.state_dict()))
    return path


def session(model: Path | bytes, threads: int) -> ort.InferenceSession:
    """An ONNX Runtime CPU session of a file or of serialized model bytes, with surgeon's options
    (exact int8 arithmetic on x86 CPUs without VNNI: what ``surgeon bench`` and ``Session`` run)."""
    opts = session_options(threads)
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), opts,
                                providers=["CPUExecutionProvider"])


def timed(sess: ort.InferenceSession, x: np.ndarray, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        sess.run(None, {"images": x})
    return (time.perf_counter() - t0) / n


def interleaved_medians(sessions: dict[str, ort.InferenceSession], x: np.ndarray, rounds: int,
                        reps: int) -> dict[str, float]:
    """Median seconds per run of each session on ``x``: warmed up, then ``rounds`` rounds alternating
    the order (A B, B A, ...) so drift on a shared machine hits every side alike."""
    for s in sessions.values():
        timed(s, x, 2)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for r in range(rounds):
        order = list(sessions) if r % 2 == 0 else list(sessions)[::-1]
        for k in order:
            times[k].append(timed(sessions[k], x, reps))
    return {k: statistics.median(v) for k, v in times.items()}


def sessions_twice(files: dict[str, Path], threads: int) -> dict[str, ort.InferenceSession]:
    """Two sessions per file, created A B C C B A (``NAME#i``): where a session lands in memory moves
    its speed by a few percent here (as train_step.py found for models)."""
    order = list(files) + list(files)[::-1]
    return {f"{k}#{i}": session(files[k], threads) for i, k in enumerate(order)}


def side_medians(sessions: dict[str, ort.InferenceSession], x: np.ndarray, rounds: int, block_s: float) -> dict[str, float]:
    """Seconds per run of each file (``sessions_twice``): interleaved medians of timed blocks of about
    ``block_s`` seconds, a file's time the mean of its two sessions' medians."""
    first = next(iter(sessions.values()))
    reps = max(1, round(block_s / timed(first, x, 2)))
    per_session = interleaved_medians(sessions, x, rounds, reps=reps)
    sides = dict.fromkeys(name.split("#")[0] for name in sessions)
    return {k: statistics.mean(v for name, v in per_session.items() if name.split("#")[0] == k) for k in sides}


def latency_parser(doc: str, rounds: int, batches: list[int]) -> argparse.ArgumentParser:
    """The options every ONNX Runtime latency script takes: --rounds, --batches, --threads, --json."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=rounds)
    ap.add_argument("--batches", type=int, nargs="+", default=batches)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    return ap


def main() -> None:
    args = latency_parser(__doc__, 15, [1, 32]).parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        for label, arch, layer, units in CASES:
            grown = checkpoint(d / "grown.pt", arch, layer, units, norm=True)
            plain = checkpoint(d / "plain.pt", arch, layer, units, norm=False)
            files = {
                "folded": export_checkpoint(grown, d / "folded.onnx").path,
                "unfolded": export_checkpoint(grown, d / "unfolded.onnx", fold=False).path,
                "plain": export_checkpoint(plain, d / "plain.onnx").path,
            }
            sessions = {k: session(p, args.threads) for k, p in files.items()}
            for batch in args.batches:
                x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224), dtype=np.float32)
                med = interleaved_medians(sessions, x, args.rounds, reps=max(1, 16 // batch))
                row = {"case": label, "batch": batch, **{f"{k}_ms": 1e3 * v for k, v in med.items()},
                       "folded_over_plain": med["folded"] / med["plain"],
                       "unfolded_over_folded": med["unfolded"] / med["folded"]}
                rows.append(row)
                print(f"{label:<42} batch {batch:>2}: folded {1e3 * med['folded']:8.2f} ms  plain {1e3 * med['plain']:8.2f} ms  "
                      f"unfolded {1e3 * med['unfolded']:8.2f} ms   folded/plain {row['folded_over_plain']:.3f}  "
                      f"unfolded/folded {row['unfolded_over_folded']:.3f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": args.threads, "ort": ort.__version__, "results": rows}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
