"""Where `surgeon export`'s time goes on the grown VGG16 of ``surgery.py`` (fc6 and fc7 widened by
1024, 100 classes, 0.68 GB): ``surgeon export`` as users run it, each run in a fresh interpreter
(its wall time includes starting and shutting down), with timers around the stages of
``export_checkpoint`` — imports, reading the checkpoint, ``torch.onnx.export``, the PyTorch reference,
the export stage's whole-model ONNX Runtime check, the passes with their verification, the atomic
write — beside onnxsim on the same model's ``--no-fold`` file, the two alternating (A B B A ...).

    pip install onnxsim && python benchmarks/export_stages.py [--runs 2] [--json out.json]

``--onnxsim-python PY`` runs onnxsim in another interpreter (a virtualenv of its own, so installing
it leaves surgeon's environment as it is).

With ``--no-optimize`` the export runs ``torch.onnx.export(..., optimize=False)`` (the exporter's own
ONNX optimizer off) to measure what that optimizer costs and saves.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from surgery import GROW, warm  # sibling script (benchmarks/ is on sys.path)

# Runs `surgeon export` in a fresh interpreter, with timers around its stages: argv = checkpoint,
# output, optimize (0/1); prints one JSON line.
STAGES = """
import contextlib, io, json, sys, time
t0 = time.perf_counter()
import torch
import surgeon.export.incremental as incremental
import surgeon.export.lean as lean
import surgeon.export.onnx_export as export
import surgeon.export.passes as passes
times = {"imports": time.perf_counter() - t0}

def timed(owner, name, key):
    f = getattr(owner, name)
    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            times[key] = times.get(key, 0.0) + time.perf_counter() - t
    setattr(owner, name, wrapper)

real_export, optimize = torch.onnx.export, sys.argv[3] == "1"
def onnx_export(*a, **k):
    k["optimize"] = optimize
    return real_export(*a, **k)
torch.onnx.export = onnx_export
timed(export, "read_checkpoint", "read checkpoint")
timed(export, "to_onnx", "torch.onnx.export")
timed(export, "torch_reference", "PyTorch reference")
timed(incremental.IncrementalVerifier, "export", "ONNX Runtime check of the export")
timed(lean.LeanModel, "save", "write (atomic, fsync)")
real_default = passes.default_passes
def default_passes(*a, **k):
    manager = real_default(*a, **k)
    timed(manager, "run", "passes, each verified")
    return manager
passes.default_passes = default_passes
real_checkpoint = export.export_checkpoint
def export_checkpoint(*a, **k):
    result = real_checkpoint(*a, **k)
    times["ops left"] = sum(result.ops_after.values())
    return result
export.export_checkpoint = export_checkpoint
import surgeon.cli
sys.argv = ["surgeon", "export", sys.argv[1], "-o", sys.argv[2]]
try:
    with contextlib.redirect_stdout(io.StringIO()):
        surgeon.cli.main()  # what users run; ends in SystemExit
finally:
    times["total in process"] = time.perf_counter() - t0
    print(json.dumps(times), flush=True)
"""
ONNXSIM = "import onnx, onnxsim, sys; m, ok = onnxsim.simplify(onnx.load(sys.argv[1])); assert ok; onnx.save(m, sys.argv[2])"
UNFOLDED = "import sys; from surgeon.export.onnx_export import export_checkpoint; export_checkpoint(sys.argv[1], sys.argv[2], fold=False)"


def wall(*cmd: str, python: str = sys.executable) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run([python, *cmd], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {cmd[:2]}\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t0, proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=2, help="runs of each side (A B B A ...)")
    ap.add_argument("--no-optimize", action="store_true")
    ap.add_argument("--onnxsim-python", default=sys.executable, help="interpreter with onnxsim installed")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        ckpt, out, unfolded, sim = (str(d / n) for n in ("grown.pt", "model.onnx", "unfolded.onnx", "sim.onnx"))
        wall("-c", "import sys\n" + GROW, ckpt, "classifier.0=1024,classifier.3=1024")
        wall("-c", UNFOLDED, ckpt, unfolded)
        surgeon_runs, onnxsim_runs = [], []
        for i in range(2 * args.runs):
            if (i % 4) in (0, 3):
                seconds, stdout = wall("-c", STAGES, ckpt, out, "0" if args.no_optimize else "1")
                stages = json.loads(stdout.strip().splitlines()[-1])
                surgeon_runs.append({"wall": seconds, **stages})
                print(f"surgeon export {seconds:5.1f} s: " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items()), flush=True)
            else:
                warm(unfolded)  # surgeon wrote it past the page cache; onnxsim starts from a cached input, as surgeon does
                seconds, _ = wall("-c", ONNXSIM, unfolded, sim, python=args.onnxsim_python)
                onnxsim_runs.append(seconds)
                print(f"onnxsim        {seconds:5.1f} s", flush=True)
        s, o = statistics.median(r["wall"] for r in surgeon_runs), statistics.median(onnxsim_runs)
        passes = statistics.median(r["passes, each verified"] for r in surgeon_runs)
        print(f"medians: surgeon export {s:.1f} s = {s / o:.2f}x onnxsim's {o:.1f} s; "
              f"the passes with their verification {passes:.2f} s = {passes / o:.2f}x onnxsim's time")
    if args.json:
        Path(args.json).write_text(json.dumps({"surgeon": surgeon_runs, "onnxsim": onnxsim_runs}, indent=2))


if __name__ == "__main__":
    main()
