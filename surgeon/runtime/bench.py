"""Latency and throughput of one or two models, measured side by side in one process.

Each batch size runs warm-up calls, then ``iters`` rounds; a round times one call of each model in
alternating order (A B, then B A, ...) so drift and noise hit both alike. Reported per model:
median, p90 and p99 latency and throughput (images/s at the median); with two models, the ratio of
medians (second ÷ first).
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from surgeon.runtime.session import Session


@dataclass
class Stats:
    model: str
    backend: str
    batch: int
    median_ms: float
    p90_ms: float
    p99_ms: float
    throughput: float  # images per second at the median latency
    calls: int


def _stats(model: str, backend: str, batch: int, seconds: list[float]) -> Stats:
    ms = np.asarray(seconds) * 1e3
    median = float(np.median(ms))
    return Stats(model, backend, batch, median, float(np.percentile(ms, 90)), float(np.percentile(ms, 99)),
                 batch / (median / 1e3), len(ms))


def bench(sessions: Sequence[Session], batches: Sequence[int], *, warmup: int = 5, iters: int = 50, seed: int = 0,
          progress: Callable[[int], None] | None = None) -> dict:
    """Interleaved timings of ``sessions`` (one or two) at each batch size; a JSON-able dict."""
    if not 1 <= len(sessions) <= 2:
        raise ValueError("bench compares one or two models")
    shape = sessions[0].artifact.input_shape
    for other in sessions[1:]:
        if other.artifact.input_shape != shape:
            raise ValueError(f"the models take different inputs: {list(shape)} vs {list(other.artifact.input_shape)}")
    rng = np.random.default_rng(seed)
    rows = []
    for batch in batches:
        x = rng.standard_normal((batch, *shape), dtype=np.float32)
        for s in sessions:
            for _ in range(warmup):
                s.run(x)
        times: list[list[float]] = [[] for _ in sessions]
        order: list[int] = []
        for i in range(iters):
            for k in (range(len(sessions)) if i % 2 == 0 else reversed(range(len(sessions)))):
                t0 = time.perf_counter()
                sessions[k].run(x)
                times[k].append(time.perf_counter() - t0)
                order.append(k)
            if progress:
                progress(1)
        stats = [_stats(str(s.artifact.path), s.backend, batch, t) for s, t in zip(sessions, times)]
        row = {"batch": batch, "results": [asdict(st) for st in stats], "order": "".join("AB"[k] for k in order[:8])}
        if len(stats) == 2:
            row["ratio"] = stats[1].median_ms / stats[0].median_ms
        rows.append(row)
    return {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "python": platform.python_version(),
            "warmup": warmup, "iters": iters, "batches": list(batches), "runs": rows}
