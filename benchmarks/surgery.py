"""Surgery on a grown VGG16: wall time and peak memory of export + passes + verification, beside
onnxsim and onnxslim simplifying the same exported file (their simplification only).

Each tool runs in its own process; peak memory is that process's maximum resident set size.

    pip install onnxsim onnxslim
    python benchmarks/surgery.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GROW = """
import torch
from surgeon.checkpoint import Checkpoint, save_checkpoint
from surgeon.grow.analysis import trace
from surgeon.grow.ops import GrowthState, apply_steps
from surgeon.grow.recipe import GrowStep, HeadStep
from surgeon.preprocessing import Preprocessing
from surgeon.zoo import build_architecture
torch.manual_seed(0)
gm = trace(build_architecture("torchvision:vgg16"))
steps = [HeadStep(100), GrowStep("wide", "classifier.0", 1024, gamma_init=10.0), GrowStep("wide", "classifier.3", 1024, gamma_init=10.0)]
apply_steps(gm, steps, GrowthState(224))
save_checkpoint(sys.argv[1], Checkpoint("torchvision:vgg16", "none", steps, [str(i) for i in range(100)], Preprocessing(), gm.state_dict()))
"""

TOOLS = {
    "surgeon export (export + passes + verification)":
        "from surgeon.export.onnx_export import export_checkpoint; export_checkpoint(sys.argv[1], sys.argv[2])",
    "surgeon export --no-fold (export + cleanup + verification)":
        "from surgeon.export.onnx_export import export_checkpoint; export_checkpoint(sys.argv[1], sys.argv[3], fold=False)",
    "onnxsim on the --no-fold file":
        "import onnx, onnxsim; m, ok = onnxsim.simplify(onnx.load(sys.argv[3])); assert ok; onnx.save(m, sys.argv[4])",
    "onnxslim on the --no-fold file":
        "import onnxslim; onnxslim.slim(sys.argv[3], sys.argv[5])",
}


def run(code: str, *args: str) -> tuple[float, float]:
    """Wall seconds and peak RSS (GB) of ``code`` in a fresh interpreter."""
    wrapper = f"import sys, resource\n{code}\nprint(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", wrapper, *args], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"failed: {code[:60]}...\n{proc.stderr[-2000:]}")
    return wall, int(proc.stdout.strip().splitlines()[-1]) / 1e6  # ru_maxrss is in KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        files = [str(d / n) for n in ("grown.pt", "folded.onnx", "unfolded.onnx", "sim.onnx", "slim.onnx")]
        run(GROW, files[0])
        size_gb = Path(files[0]).stat().st_size / 1e9
        baseline_wall, baseline_rss = run("import torch, onnx, onnxruntime, surgeon.export.onnx_export")
        rows = []
        print(f"grown VGG16 checkpoint: {size_gb:.2f} GB; interpreter with torch+onnx+ORT imported: {baseline_rss:.2f} GB")
        for name, code in TOOLS.items():
            wall, rss = run(code, *files)
            rows.append({"tool": name, "wall_s": wall, "peak_rss_gb": rss, "peak_over_model": rss / size_gb})
            print(f"{name:<62} {wall:7.1f} s   peak {rss:5.2f} GB  ({rss / size_gb:.1f}x the model)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"model_gb": size_gb, "baseline_rss_gb": baseline_rss, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
