"""Pass protocol, results and the manager that runs passes to a fixed point."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.logger import G_LOGGER

# The passes report what they do; onnx-graphsurgeon's own warnings (colors, folding sizes) are noise here.
G_LOGGER.severity = G_LOGGER.ERROR


def constant_value(t: gs.Tensor):
    """The array of a constant tensor, None for anything computed at run time."""
    return t.values if isinstance(t, gs.Constant) else None


def is_graph_output(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(tensor is t for t in graph.outputs)


@dataclass
class PassResult:
    name: str
    changed: list[tuple[str, str]] = field(default_factory=list)  # (candidate, what was done)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (candidate, why not)

    @property
    def did_change(self) -> bool:
        return bool(self.changed)


GraphPass = Callable[[gs.Graph], PassResult]


def import_graph(model: onnx.ModelProto) -> gs.Graph:
    """gs.Graph with inferred shapes (passes read spatial sizes from them)."""
    from surgeon.export.large import infer_shapes

    try:
        model = infer_shapes(model)
    except Exception:
        pass  # shapes help the passes; without them a pass skips what it cannot prove
    return gs.import_onnx(model)


def export_graph(graph: gs.Graph, template: onnx.ModelProto) -> onnx.ModelProto:
    """Back to a ModelProto keeping the template's functions, opsets and metadata."""
    out = gs.export_onnx(graph, do_type_check=False)
    del out.functions[:]
    out.functions.extend(template.functions)
    del out.opset_import[:]
    out.opset_import.extend(template.opset_import)
    del out.metadata_props[:]
    out.metadata_props.extend(template.metadata_props)
    out.ir_version = template.ir_version
    out.producer_name, out.producer_version = template.producer_name, template.producer_version
    del out.graph.value_info[:]  # stale after edits; runtimes infer again
    return out


@dataclass
class PassManager:
    passes: list[tuple[str, GraphPass]]
    max_rounds: int = 4

    def run(self, model: onnx.ModelProto,
            after_each: Callable[[str, onnx.ModelProto], None] | None = None) -> tuple[onnx.ModelProto, list[PassResult]]:
        """Run every pass in order until a whole round changes nothing. ``after_each(name, model)``
        is called after each pass that changed the graph (verification raises there)."""
        results: list[PassResult] = []
        for _ in range(self.max_rounds):
            changed = False
            for name, fn in self.passes:
                graph = import_graph(model)
                result = fn(graph)
                result.name = name
                results.append(result)
                if result.did_change:
                    graph.cleanup().toposort()
                    model = export_graph(graph, model)
                    changed = True
                    if after_each is not None:
                        after_each(name, model)
            if not changed:
                break
        return model, results


def default_passes(fold: bool = True) -> PassManager:
    from surgeon.export.passes.cleanup import cleanup
    from surgeon.export.passes.fold_gamma import fold_gamma
    from surgeon.export.passes.merge_parallel import merge_parallel

    passes: list[tuple[str, GraphPass]] = [("cleanup", cleanup)]
    if fold:
        passes += [("fold-gamma", fold_gamma), ("merge-parallel", merge_parallel)]
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
