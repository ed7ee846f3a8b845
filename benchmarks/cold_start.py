"""Cold start of the command line: `surgeon --help` and `surgeon predict model.onnx img.png`, wall
time and peak RSS of a fresh process, this tree (B) against another checkout (A, e.g. the commit
before the deploy side dropped PyTorch), interleaved A B B A per round, medians.

    git worktree add /tmp/surgeon-old c443f1d
    python -m tests.deploy.fixtures build/deploy-fixtures        # model.onnx (needs the train extra)
    python benchmarks/cold_start.py --old /tmp/surgeon-old --model build/deploy-fixtures/model.onnx

Both run in this interpreter's environment (the dev virtualenv has what either needs); each
checkout is put first on PYTHONPATH, so its own `surgeon` package is the one imported. "Cold" means
a new interpreter each time; the OS's file cache is warm after the first round (the warm-up round is
not counted).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_once(tree: Path, args: list[str], cwd: str) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of ``python -m surgeon ARGS`` importing surgeon from ``tree``
    (run from a neutral ``cwd``: ``-m`` puts the current folder first on sys.path)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "surgeon", *args], env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode != 0:
        raise SystemExit(f"{tree}: surgeon {' '.join(args)} failed ({proc.returncode}): {err.strip()[:300]}")
    return wall, usage.ru_maxrss / 1024  # Linux: KiB


def _imported_from(tree: Path, cwd: str) -> Path:
    out = subprocess.run([sys.executable, "-c", "import surgeon; print(surgeon.__file__)"], cwd=cwd, check=True,
                         env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True, text=True).stdout
    return Path(out.strip())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", required=True, type=Path, help="the other checkout (A)")
    ap.add_argument("--model", required=True, type=Path, help="an exported .onnx file")
    ap.add_argument("--rounds", type=int, default=5, help="A B B A rounds (each gives two runs per side)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "img.png"
        Image.new("RGB", (64, 48), (120, 30, 200)).save(image)
        cases = {"--help": ["--help"], "predict": ["predict", str(args.model.resolve()), str(image)]}
        trees = {"A": args.old.resolve(), "B": ROOT}
        results: dict[str, dict[str, list[tuple[float, float]]]] = {c: {"A": [], "B": []} for c in cases}
        for name, argv in cases.items():
            for side in "AB":  # warm-up: file cache, .pyc files
                assert _imported_from(trees[side], tmp) == trees[side] / "surgeon" / "__init__.py"
                run_once(trees[side], argv, tmp)
            for _ in range(args.rounds):
                for side in "ABBA":
                    results[name][side].append(run_once(trees[side], argv, tmp))
    summary = {}
    for name, sides in results.items():
        row = {}
        for side, runs in sides.items():
            row[side] = {"wall_s": statistics.median(w for w, _ in runs), "peak_rss_mib": statistics.median(r for _, r in runs),
                         "runs": len(runs)}
        row["wall_ratio_B_over_A"] = row["B"]["wall_s"] / row["A"]["wall_s"]
        summary[name] = row
        print(f"surgeon {name:<8} A {row['A']['wall_s']:6.2f} s {row['A']['peak_rss_mib']:7.0f} MiB   "
              f"B {row['B']['wall_s']:6.2f} s {row['B']['peak_rss_mib']:7.0f} MiB   B/A {row['wall_ratio_B_over_A']:.2f} "
              f"(medians of {row['A']['runs']} runs each)")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
