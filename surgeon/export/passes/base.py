"""Pass protocol, results and the manager that runs passes to a fixed point."""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.logger import G_LOGGER

from surgeon.export.lean import LeanModel, is_weight

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


# A rule over one Concat: None when the pattern does not match, "" when it rewrote the graph, else
# why it matched but was refused.
ConcatRule = Callable[[gs.Graph, gs.Node], "str | None"]


def run_concat_rules(graph: gs.Graph, name: str, rules: list[tuple[ConcatRule, str]]) -> PassResult:
    """Offer every Concat (with producers) to ``rules`` in order; the first that matches decides.
    Each rule comes with its report, a template filled with the Concat's producer names."""
    result = PassResult(name)
    for concat in [n for n in graph.nodes if n.op == "Concat"]:
        if not concat.outputs or any(not t.inputs for t in concat.inputs):
            continue
        producers = ", ".join(t.inputs[0].name for t in concat.inputs)
        for rule, done in rules:
            why = rule(graph, concat)
            if why is None:
                continue
            if why == "":
                result.changed.append((concat.name, done.format(producers)))
            else:
                result.skipped.append((f"{concat.name} ({producers})", why))
            break
    return result


def _lean(model: LeanModel | onnx.ModelProto) -> LeanModel:
    return model if isinstance(model, LeanModel) else LeanModel.from_proto(model)


def import_graph(model: LeanModel | onnx.ModelProto) -> gs.Graph:
    """gs.Graph with inferred shapes (passes read spatial sizes from them). The weights become
    constants holding the very same arrays: nothing is copied."""
    lean = _lean(model)
    try:
        proto = lean.infer_shapes()
    except Exception:
        proto = lean.proto  # shapes help the passes; without them a pass skips what it cannot prove
    graph = gs.import_onnx(proto)
    tensors = graph.tensors()
    for name, array in lean.weights.items():
        if name in tensors:
            tensors[name].to_constant(array)
    graph.inputs = [t for t in graph.inputs if t.name not in lean.weights]
    return graph


def export_graph(graph: gs.Graph, template: LeanModel | onnx.ModelProto) -> LeanModel | onnx.ModelProto:
    """Back to the template's kind, keeping its functions, opsets and metadata. Large constants
    leave as weights (shared, not serialized); ``graph`` is left as it was."""
    weights: dict[str, np.ndarray] = {}
    moved = []
    for t in graph.tensors().values():
        if isinstance(t, gs.Constant) and is_weight(t.shape):
            weights[t.name] = t.values
            moved.append(t)
    for t in moved:
        t.to_variable(dtype=weights[t.name].dtype, shape=list(weights[t.name].shape))
        t.type = "tensor_type"  # to_variable (onnx-graphsurgeon 0.6) leaves the attribute unset; the exporter reads it
    inputs = list(graph.inputs)
    graph.inputs = inputs + moved
    try:
        out = gs.export_onnx(graph, do_type_check=False)
    finally:
        graph.inputs = inputs
        for t in moved:
            t.to_constant(weights[t.name])
    source = template.proto if isinstance(template, LeanModel) else template
    del out.functions[:]
    out.functions.extend(source.functions)
    del out.opset_import[:]
    out.opset_import.extend(source.opset_import)
    del out.metadata_props[:]
    out.metadata_props.extend(source.metadata_props)
    out.ir_version = source.ir_version
    out.producer_name, out.producer_version = source.producer_name, source.producer_version
    del out.graph.value_info[:]  # stale after edits; runtimes infer again
    lean = LeanModel(out, weights)
    return lean if isinstance(template, LeanModel) else lean.to_proto()


@dataclass
class PassManager:
    passes: list[tuple[str, GraphPass]]
    max_rounds: int = 4

    def run(self, model: LeanModel | onnx.ModelProto,
            after_each: Callable[[str, LeanModel], None] | None = None) -> tuple[Any, list[PassResult]]:
        """Run every pass in order until a whole round changes nothing. A LeanModel is edited in place
        (so tensors a pass replaces are freed as it goes) and returned; a ModelProto is left as it
        is and a new one returned. ``after_each(name, model)`` is called after each pass that
        changed the graph (verification raises there)."""
        in_place = isinstance(model, LeanModel)
        lean = _lean(model)
        results: list[PassResult] = []
        for _ in range(self.max_rounds):
            changed = False
            for name, fn in self.passes:
                graph = import_graph(lean)
                result = fn(graph)
                result.name = name
                results.append(result)
                if result.did_change:
                    graph.cleanup().toposort()
                    edited = export_graph(graph, lean)
                    lean.proto, lean.weights = edited.proto, edited.weights
                del graph
                gc.collect()  # a gs.Graph is cyclic: collect it now, with the tensors the pass replaced
                if result.did_change:
                    changed = True
                    if after_each is not None:
                        after_each(name, lean)
            if not changed:
                break
        return (lean if in_place else lean.to_proto()), results


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
