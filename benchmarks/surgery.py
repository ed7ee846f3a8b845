"""Surgery on a grown VGG16: wall time and peak memory of ``surgeon export`` (export + passes +
verification, the CLI as users run it), beside onnxsim and onnxslim simplifying the same exported
file (their simplification only).

Each tool runs in its own process; peak memory is that process's maximum resident set size. Each
tool's baseline is the same process doing the same work on a tiny model (libraries loaded and
used once), so ``peak − baseline`` is what the large model costs.

    pip install onnxsim onnxslim
    python benchmarks/surgery.py [--json out.json] [--large 16384]
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
steps = [HeadStep(100), *(GrowStep("wide", layer, int(units), gamma_init=10.0) for layer, units in (s.split("=") for s in sys.argv[2].split(",")))]
apply_steps(gm, steps, GrowthState(224))
save_checkpoint(sys.argv[1], Checkpoint("torchvision:vgg16", "none", steps, [str(i) for i in range(100)], Preprocessing(), gm.state_dict()))
"""

# Each tool with the same work on a tiny model: the interpreter with that tool's libraries loaded
# and used once, so "peak − baseline" is what the large model itself costs.
TINY = """
import torch, onnx
from surgeon.export.onnx_export import to_onnx
to_onnx(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10)), 8).save(sys.argv[6])
"""
RUN_TINY = "import numpy as np; OrtRunner(sys.argv[6]).run(np.zeros((1, 3, 8, 8), np.float32))\n"
# A surgeon command as users run it (the CLI in a fresh interpreter: starting and shutting down count).
CLI = "from surgeon.cli import main; sys.argv = ['surgeon', {}]; main()"
TOOLS = {
    "surgeon export (export + passes + verification)": (
        CLI.format("'export', sys.argv[1], '-o', sys.argv[2]"),
        "from surgeon.export.verify import OrtRunner; import onnx_graphsurgeon" + TINY + RUN_TINY),
    "surgeon export --no-fold (export + cleanup + verification)": (
        CLI.format("'export', sys.argv[1], '-o', sys.argv[3], '--no-fold'"),
        "from surgeon.export.verify import OrtRunner; import onnx_graphsurgeon" + TINY + RUN_TINY),
    "onnxsim on the --no-fold file": (
        "import onnx, onnxsim; m, ok = onnxsim.simplify(onnx.load(sys.argv[3])); assert ok; onnx.save(m, sys.argv[4])",
        "import onnx, onnxsim; m, ok = onnxsim.simplify(onnx.load(sys.argv[6])); assert ok"),
    "onnxslim on the --no-fold file": (
        "import onnxslim; onnxslim.slim(sys.argv[3], sys.argv[5])",
        "import onnxslim; onnxslim.slim(sys.argv[6], sys.argv[6] + '.slim.onnx')"),
}


def run(code: str, *args: str) -> tuple[float, float]:
    """Wall seconds and peak RSS (GB) of ``code`` in a fresh interpreter."""
    # Printed at exit, so that code ending in SystemExit (the CLI) reports too; the last line of stdout.
    wrapper = ("import sys, resource, atexit\n"
               f"atexit.register(lambda: print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))\n{code}")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", wrapper, *args], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"failed: {code[:60]}...\n{proc.stderr[-2000:]}")
    return wall, int(proc.stdout.strip().splitlines()[-1]) / 1e6  # ru_maxrss is in KiB on Linux


def warm(*paths: str) -> None:
    """Read the tools' inputs into the page cache: every tool starts from a cached input (surgeon
    writes its models past the page cache, so the ``--no-fold`` file would otherwise be read from
    the disk by onnxsim and onnxslim only)."""
    for p in paths:
        if not Path(p).exists():  # the --no-fold file, before surgeon has written it
            continue
        with open(p, "rb") as f:
            while f.read(16 << 20):
                pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None)
    ap.add_argument("--large", type=int, default=0, metavar="UNITS",
                    help="also export + verify a VGG16 whose fc6 grows by UNITS (16384: a 2.5 GB model, external data)")
    ap.add_argument("--large-only", action="store_true", help="only the --large model")
    args = ap.parse_args()
    if args.large_only and not args.large:
        ap.error("--large-only needs --large UNITS")
    report: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        if args.large_only:
            report["large"] = large(d, args.large)
            print(json.dumps(report["large"]))
            return
        files = [str(d / n) for n in ("grown.pt", "folded.onnx", "unfolded.onnx", "sim.onnx", "slim.onnx", "tiny.onnx")]
        run(GROW, files[0], "classifier.0=1024,classifier.3=1024")
        run(TINY, *files)
        size_gb = Path(files[0]).stat().st_size / 1e9
        rows = []
        print(f"grown VGG16 checkpoint: {size_gb:.2f} GB")
        for name, (code, baseline_code) in TOOLS.items():
            _, base = run(baseline_code, *files)
            warm(files[0], files[2])
            wall, rss = run(code, *files)
            rows.append({"tool": name, "wall_s": wall, "peak_rss_gb": rss, "baseline_rss_gb": base,
                         "peak_over_model": rss / size_gb, "above_baseline_over_model": (rss - base) / size_gb})
            print(f"{name:<62} {wall:7.1f} s   peak {rss:5.2f} GB ({rss / size_gb:.1f}x the model); "
                  f"baseline {base:.2f} GB; peak - baseline = {(rss - base) / size_gb:.2f}x the model", flush=True)
        report.update(model_gb=size_gb, results=rows)
        if args.large:
            report["large"] = large(d, args.large)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


def large(d: Path, units: int) -> dict:
    """A model over protobuf's 2 GB limit through export + passes + verification, then `surgeon
    verify` on the written files (ONNX Runtime reads the external data)."""
    ckpt, onnx_path = d / "large.pt", d / "large.onnx"
    for f in d.iterdir():  # the small model's files are done with: keep the disk free
        f.unlink()
    run(GROW, str(ckpt), f"classifier.0={units}")
    size_gb = ckpt.stat().st_size / 1e9
    wall, rss = run(CLI.format("'export', sys.argv[1], '-o', sys.argv[2]"), str(ckpt), str(onnx_path))
    files = {p.name: p.stat().st_size / 1e9 for p in d.iterdir() if p.name.startswith("large.onnx")}
    vwall, vrss = run(CLI.format("'verify', sys.argv[2], '--against', sys.argv[1]"), str(ckpt), str(onnx_path))
    print(f"grown VGG16 fc6 +{units}: checkpoint {size_gb:.2f} GB; files {files}")
    print(f"  surgeon export: {wall:.1f} s, peak {rss:.2f} GB ({rss / size_gb:.2f}x the model)")
    print(f"  surgeon verify: {vwall:.1f} s, peak {vrss:.2f} GB ({vrss / size_gb:.2f}x the model)")
    return {"units": units, "model_gb": size_gb, "files_gb": files, "export_wall_s": wall, "export_peak_rss_gb": rss,
            "verify_wall_s": vwall, "verify_peak_rss_gb": vrss}


if __name__ == "__main__":
    main()
