"""`surgeon serve` under load: throughput and latency percentiles at concurrency 1, 8 and 32 (HTTP
client threads, one float-tensor request of batch 1 each), against direct ``Session.run`` calls at
the same concurrency in this process. The server runs three times: without batching
(``--max-batch 1``), and with ``--max-batch 32`` at ``--max-queue-delay-us 0`` (batches only what
is already queued) and ``2000`` (waits up to 2 ms to fill a batch).

Model: DigitNet with fc6 (``classifier.0``) widened by 16 units, 4 classes, 32x32 input, random
weights, exported to ONNX (ONNX Runtime on the CPU), unless ``--model`` names another artifact.
Client and server share this machine's cores, so the ratios are what one box sees, not the network.

``--proxy-ab``: what surgeon serve's HTTP front end (the size-bounding proxy) costs. One server
(``--max-batch 32``, delay 0), and rounds alternating, in turn order A-B then B-A, between its public
port (through the proxy) and Triton's own loopback HTTP port behind it (read from the start-up line);
medians over the rounds, and the median of the per-round B/A ratios.

    python benchmarks/serve_load.py [--requests 300] [--model model.onnx] [--json out.json]
    python benchmarks/serve_load.py --proxy-ab [--rounds 7] [--requests 200]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch

from surgeon.checkpoint import Checkpoint, save_checkpoint
from surgeon.export.onnx_export import export_checkpoint
from surgeon.grow.analysis import trace
from surgeon.grow.ops import GrowthState, apply_steps
from surgeon.grow.recipe import GrowStep, HeadStep
from surgeon.runtime import Session
from surgeon.runtime.serve import free_base_port
from surgeon.zoo import DIGITS_PREPROCESSING, build_architecture

CONCURRENCY = (1, 8, 32)
# Triton's dynamic batcher with a zero delay still batches the requests already queued, so batching
# is really off only with --max-batch 1.
SETTINGS = (("max-batch 1 (no batching)", 1, 0), ("max-batch 32, delay 0us", 32, 0),
            ("max-batch 32, delay 2000us", 32, 2000))


def grown_onnx(d: Path) -> Path:
    torch.manual_seed(0)
    gm = trace(build_architecture("surgeon:digitnet"))
    steps = [HeadStep(classes=4), GrowStep("wide", "classifier.0", 16, gamma_init=10.0)]
    apply_steps(gm, steps, GrowthState(32))
    ckpt = save_checkpoint(d / "grown.pt", Checkpoint("surgeon:digitnet", "none", steps, list("abcd"),
                                                      DIGITS_PREPROCESSING, gm.state_dict()))
    return Path(export_checkpoint(ckpt, d / "model.onnx").path)


def ready(port: int, name: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/models/{name}/ready", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def load(call, concurrency: int, requests: int) -> dict:
    """``requests`` calls of ``call(thread_state)`` spread over ``concurrency`` threads."""
    lat: list[float] = []
    errors = 0
    lock = threading.Lock()
    counter = iter(range(requests))

    def worker() -> None:
        nonlocal errors
        state: dict = {}
        mine, bad = [], 0
        while True:
            with lock:
                if next(counter, None) is None:
                    break
            t0 = time.perf_counter()
            try:
                call(state)
            except Exception:  # noqa: BLE001 - counted
                bad += 1
            mine.append(time.perf_counter() - t0)
        with lock:
            lat.extend(mine)
            errors += bad

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ms = np.array(lat) * 1e3
    return {"concurrency": concurrency, "requests": len(lat), "errors": errors, "throughput": len(lat) / wall,
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def http_call(port: int, name: str, x: np.ndarray):
    import tritonclient.http as httpclient

    def call(state: dict) -> None:
        if "client" not in state:
            state["client"] = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
        inp = httpclient.InferInput("images", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        state["client"].infer(name, [inp]).as_numpy("logits")

    return call


def serve_rows(model: Path, label: str, max_batch: int, delay: int, log, log_path: Path, x: np.ndarray,
               direct: dict, requests: int) -> list[dict]:
    port, rows = free_base_port(), []
    cmd = [sys.executable, "-m", "surgeon", "serve", str(model), "--port", str(port), "--name", "m",
           "--max-batch", str(max_batch), "--max-queue-delay-us", str(delay), "--backend", "ort-cpu"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 120
        while not ready(port, "m"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"surgeon serve did not start:\n{log_path.read_text()[-2000:]}")
            time.sleep(0.5)
        call = http_call(port, "m", x)
        for c in CONCURRENCY:
            load(call, c, 20)  # warm-up (connections, first batches)
            r = load(call, c, requests)
            r["throughput_vs_direct"] = r["throughput"] / direct[c]["throughput"]
            r["p99_vs_direct"] = r["p99_ms"] / direct[c]["p99_ms"]
            rows.append({"setting": f"serve, {label}", **r})
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    return rows


def start_server(model: Path, max_batch: int, delay: int, log, log_path: Path) -> tuple[subprocess.Popen, int]:
    port = free_base_port()
    cmd = [sys.executable, "-m", "surgeon", "serve", str(model), "--port", str(port), "--name", "m",
           "--max-batch", str(max_batch), "--max-queue-delay-us", str(delay), "--backend", "ort-cpu"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 120
    while not ready(port, "m") or "ready when" not in log_path.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"surgeon serve did not start:\n{log_path.read_text()[-2000:]}")
        time.sleep(0.5)
    return proc, port


def proxy_ab(model: Path, x: np.ndarray, rounds: int, requests: int, tmp: Path) -> list[dict]:
    """Through surgeon serve's front end (A) and straight to Triton's own HTTP port (B), interleaved."""
    log_path = tmp / "serve-ab.log"
    with log_path.open("wb") as log:
        proc, port = start_server(model, 32, 0, log, log_path)
        try:
            triton = int(re.search(r"Triton's own HTTP on 127\.0\.0\.1:(\d+)", log_path.read_text()).group(1))
            calls = {"A proxy": http_call(port, "m", x), "B direct": http_call(triton, "m", x)}
            got: dict[tuple[str, int], list[dict]] = {(k, c): [] for k in calls for c in CONCURRENCY}
            for c in CONCURRENCY:
                for call in calls.values():
                    load(call, c, 20)  # warm-up
            for r in range(rounds):
                order = list(calls) if r % 2 == 0 else list(calls)[::-1]
                for c in CONCURRENCY:
                    for k in order:
                        got[k, c].append(load(calls[k], c, requests))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    rows = []
    for c in CONCURRENCY:
        a, b = got["A proxy", c], got["B direct", c]
        ratio = float(np.median([ra["throughput"] / rb["throughput"] for ra, rb in zip(a, b)]))
        for k, runs in (("A proxy", a), ("B direct", b)):
            rows.append({"setting": f"{k}, c={c}", "concurrency": c, "rounds": rounds, "requests": requests,
                         "errors": sum(r["errors"] for r in runs),
                         "throughput": float(np.median([r["throughput"] for r in runs])),
                         "p50_ms": float(np.median([r["p50_ms"] for r in runs])),
                         "p99_ms": float(np.median([r["p99_ms"] for r in runs])),
                         **({"throughput_a_over_b": ratio} if k == "A proxy" else {})})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=300, help="Requests per cell.")
    ap.add_argument("--model", default=None, help="An artifact to serve [default: the grown DigitNet, exported].")
    ap.add_argument("--json", default=None)
    ap.add_argument("--proxy-ab", action="store_true", help="Measure the HTTP front end's cost (see above).")
    ap.add_argument("--rounds", type=int, default=7, help="A/B rounds for --proxy-ab.")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else grown_onnx(Path(tmp))
        session = Session(model, "ort-cpu")
        x = np.random.default_rng(0).standard_normal((1, *session.artifact.input_shape)).astype(np.float32)
        if args.proxy_ab:
            rows = proxy_ab(model, x, args.rounds, args.requests, Path(tmp))
            print(f"{'setting':<20} {'rounds':>6} {'err':>4} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'A/B req/s':>10}")
            for r in rows:
                ratio = f"{r['throughput_a_over_b']:>10.3f}" if "throughput_a_over_b" in r else ""
                print(f"{r['setting']:<20} {r['rounds']:>6} {r['errors']:>4} {r['throughput']:>9.1f} "
                      f"{r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {ratio}")
            if args.json:
                Path(args.json).write_text(json.dumps({"mode": "proxy-ab", "rows": rows}, indent=2))
            return
        direct = {}
        for c in CONCURRENCY:
            load(lambda s: session.run(x), c, 20)  # warm-up
            direct[c] = load(lambda s: session.run(x), c, args.requests)
            rows.append({"setting": "direct Session.run", **direct[c]})
        for label, max_batch, delay in SETTINGS:
            log_path = Path(tmp) / f"serve-{max_batch}-{delay}.log"
            with log_path.open("wb") as log:
                rows += serve_rows(model, label, max_batch, delay, log, log_path, x, direct, args.requests)
    print(f"{'setting':<42} {'conc':>4} {'req':>5} {'err':>4} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'req/s vs direct':>16} {'p99 vs direct':>14}")
    for r in rows:
        extra = (f"{r['throughput_vs_direct']:>16.3f} {r['p99_vs_direct']:>14.1f}" if "throughput_vs_direct" in r
                 else f"{'':>16} {'':>14}")
        print(f"{r['setting']:<42} {r['concurrency']:>4} {r['requests']:>5} {r['errors']:>4} {r['throughput']:>9.1f} "
              f"{r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {extra}")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": str(args.model or "digitnet wide classifier.0 +16, 32x32"),
                                               "requests_per_cell": args.requests, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
