"""How long `surgeon layers --model torchvision:NAME` takes, for every torchvision classification model.

In-process, through the functions the command calls (open_model → trace → propagate_shapes →
layer_table), each stage timed, two ways per model: "ordinary" (the model built with its random
init and shapes propagated by a CPU forward pass at the model's input size, as the command did
before it used the meta device) and "command" (what `surgeon layers --weights none` does now: built
on the meta device, falling back to the ordinary path where that fails). Runs are interleaved
(round r times every model both ways, then round r + 1); the table gives medians over the rounds,
slowest first, and checks that both ways list the same table. Then the slowest few run once more
as a cold subprocess (`python -m surgeon layers`: interpreter start and imports included).

    python benchmarks/layers_time.py [--rounds 3] [--cold 5] [--models vit_h_14,convnext_tiny] [--out table.md]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

STAGES = ("open", "trace", "shapes", "table")


def time_layers(name: str, meta: bool) -> tuple[dict[str, float], list, bool]:
    """Seconds per stage of `surgeon layers --model torchvision:NAME --weights none`, the rows, and
    whether the meta device was used (``meta``: tried first, as the command does)."""
    from surgeon.grow.analysis import layer_table, propagate_shapes, trace
    from surgeon.source import open_model

    times: dict[str, float] = {k: 0.0 for k in STAGES}

    def stage(key: str, fn: Callable[[], object]) -> object:
        t0 = time.perf_counter()
        try:
            return fn()
        finally:
            times[key] += time.perf_counter() - t0

    for on_meta in (True, False) if meta else (False,):
        try:
            src = stage("open", lambda: open_model(f"torchvision:{name}", "none", meta=on_meta))
            gm = stage("trace", lambda: trace(src.module))  # type: ignore[attr-defined]
            stage("shapes", lambda: propagate_shapes(gm, src.preprocessing.input_size))  # type: ignore[attr-defined,arg-type]
            rows = stage("table", lambda: layer_table(gm))  # type: ignore[arg-type]
            break
        except Exception:
            if not on_meta:
                raise
    times["total"] = sum(times[k] for k in STAGES)
    return times, rows, on_meta  # type: ignore[return-value]


def cold_run(name: str) -> float:
    """Wall seconds of one `python -m surgeon layers` subprocess."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "surgeon", "layers", "--model", f"torchvision:{name}"],
                   check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def medians(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in (*STAGES, "total")}


def markdown(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]], on_meta: dict[str, bool],
             cold: dict[str, float]) -> str:
    lines = ["| model | ordinary: open | trace | shapes | table | total | command: total | path | ordinary ÷ command | cold subprocess |",
             "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for name, b in sorted(before.items(), key=lambda kv: -kv[1]["total"]):
        a = after[name]["total"]
        c = f"{cold[name]:.2f}" if name in cold else ""
        lines.append(f"| {name} | " + " | ".join(f"{b[k]:.2f}" for k in (*STAGES, "total"))
                     + f" | {a:.2f} | {'meta' if on_meta[name] else 'fallback'} | {b['total'] / a:.1f} | {c} |")
    return "\n".join(lines)


def main() -> None:
    import torch
    import torchvision

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cold", type=int, default=5, help="the slowest N also run as a cold subprocess")
    ap.add_argument("--models", default="", help="comma-separated subset (default: all)")
    ap.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = ap.parse_args()

    torch.set_grad_enabled(False)
    reference: dict[str, list] = {}
    names = args.models.split(",") if args.models else sorted(torchvision.models.list_models(module=torchvision.models))
    runs: dict[str, dict[bool, list[dict[str, float]]]] = {n: {False: [], True: []} for n in names}
    on_meta: dict[str, bool] = {}
    failed: dict[str, str] = {}
    for r in range(args.rounds):
        for name in names:
            for meta in (False, True):
                if name in failed:
                    continue
                try:
                    times, rows, on_meta[name] = time_layers(name, meta)
                except Exception as exc:  # reported in the table, not timed
                    failed[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                    continue
                runs[name][meta].append(times)
                if meta and rows != reference[name]:
                    failed[name] = "the meta-device table differs from the ordinary one"
                if not meta:
                    reference[name] = rows
            print(f"round {r + 1}: {name} " + (f"FAILED {failed[name]}" if name in failed else
                  f"{runs[name][False][-1]['total']:.2f} s -> {runs[name][True][-1]['total']:.2f} s"), file=sys.stderr, flush=True)
    before = {n: medians(v[False]) for n, v in runs.items() if n not in failed}
    after = {n: medians(v[True]) for n, v in runs.items() if n not in failed}
    slowest = sorted(after, key=lambda n: -after[n]["total"])[: args.cold]
    cold = {n: cold_run(n) for n in slowest}
    table = markdown(before, after, on_meta, cold) + "".join(f"\n\nFAILED {n}: {why}" for n, why in failed.items())
    worst = max(after.values(), key=lambda m: m["total"])["total"] if after else 0.0
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, {torch.get_num_threads()} threads, "
          f"median of {args.rounds} interleaved rounds, seconds\n")
    print(table)
    print(f"\nslowest with the command's path: {worst:.2f} s in-process"
          + (f", {max(cold.values()):.2f} s cold" if cold else ""))
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
