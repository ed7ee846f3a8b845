"""The pass manager: every pass, round after round, on one graph until a round changes nothing.

The model is imported into one onnx-graphsurgeon graph (:mod:`.graph` says why that IR) once per
run; the passes and their rules (:mod:`.rules`) edit it in place. A proto is made only where one is
needed — for ``after_each`` (verification) after a pass that changed the graph, and for the result
— and it shares the graph's arrays (:func:`export_graph`): no weight is copied or serialized.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from surgeon.collect import young_collections
from surgeon.export.lean import LeanModel
# Re-exported: the IR helpers and results were defined here before the passes moved to one IR.
from surgeon.export.passes.graph import constant_value, export_graph, import_graph, is_graph_output, lean_of, refresh_shapes
from surgeon.export.passes.rules import GraphPass, PassResult

__all__ = ["GraphPass", "PassManager", "PassResult", "constant_value", "default_passes", "export_graph",
           "import_graph", "is_graph_output", "summarize"]


@dataclass
class PassManager:
    passes: list[tuple[str, GraphPass]]
    max_rounds: int = 4

    def run(self, model: LeanModel | onnx.ModelProto,
            after_each: Callable[[str, LeanModel], None] | None = None) -> tuple[Any, list[PassResult]]:
        """Run every pass in order until a whole round changes nothing. A LeanModel is edited in place
        (it follows the graph after every change, so tensors a pass replaces are freed as it goes)
        and returned; a ModelProto is left as it is and a new one returned. ``after_each(name,
        model)`` is called after each pass that changed the graph, with the model as it is then
        (verification raises there)."""
        in_place = isinstance(model, LeanModel)
        lean = lean_of(model)
        results: list[PassResult] = []
        with young_collections(), _no_huge_pages():
            graph = import_graph(lean)  # the only conversion into the IR
            for _ in range(self.max_rounds):
                changed = False
                for name, fn in self.passes:
                    result = fn(graph)
                    result.name = name
                    results.append(result)
                    if not result.did_change:
                        continue
                    changed = True
                    graph.cleanup().toposort()
                    edited = export_graph(graph, lean)
                    lean.proto, lean.weights = edited.proto, edited.weights
                    # gs tensors are cyclic: the constants a pass replaced (a merged branch's
                    # weights) are freed by a collection, before the next pass allocates more.
                    gc.collect()
                    refresh_shapes(graph, lean)
                    if after_each is not None:
                        after_each(name, lean)
                if not changed:
                    break
            del graph
            gc.collect()
        return (lean if in_place else lean.to_proto()), results


@contextlib.contextmanager
def _no_huge_pages() -> Iterator[None]:
    """numpy asks the kernel for huge pages for every large array; where the kernel then compacts
    memory to find them (transparent_hugepage defrag=madvise), the first touch of a merged 0.5 GB
    weight stalls ~2 s instead of ~0.3 s. The passes write each new weight once: plain pages."""
    core = getattr(np, "_core", None) or getattr(np, "core", None)  # numpy 2 / 1
    set_madvise = getattr(getattr(core, "multiarray", None), "_set_madvise_hugepage", None)
    if set_madvise is None:
        yield
        return
    before = set_madvise(False)
    try:
        yield
    finally:
        set_madvise(before)


def default_passes(fold: bool = True) -> PassManager:
    from surgeon.export.passes.cleanup import cleanup
    from surgeon.export.passes.fold_gamma import fold_gamma
    from surgeon.export.passes.merge_grouped import merge_grouped
    from surgeon.export.passes.merge_parallel import merge_parallel

    passes: list[tuple[str, GraphPass]] = [("cleanup", cleanup)]
    if fold:
        passes += [("fold-gamma", fold_gamma), ("merge-parallel", merge_parallel), ("merge-grouped", merge_grouped)]
    return PassManager(passes)


def summarize(results: list[PassResult]) -> list[dict]:
    """Merge the rounds per pass: every change, and for each candidate the reasons it was skipped —
    from its latest round, unless an earlier round already changed it (a pass that finds nothing
    left to do on a candidate it handled is idempotence, not a skip)."""
    merged: dict[str, dict] = {}
    for r in results:
        entry = merged.setdefault(r.name, {"pass": r.name, "changed": [], "skips": {}, "done": set()})
        earlier = set(entry["done"])
        for candidate, what in r.changed:
            entry["changed"].append({"candidate": candidate, "done": what})
            entry["done"].add(candidate)
        fresh: dict[str, list[str]] = {}
        for candidate, why in r.skipped:
            if candidate not in earlier:
                fresh.setdefault(candidate, []).append(why)
        for candidate, _ in r.changed:  # changed now: earlier skips of it are stale
            if candidate not in fresh:
                entry["skips"].pop(candidate, None)
        entry["skips"].update(fresh)
    return [{"pass": e["pass"], "changed": e["changed"],
             "skipped": [{"candidate": c, "reason": why} for c, whys in e["skips"].items() for why in whys]}
            for e in merged.values()]
