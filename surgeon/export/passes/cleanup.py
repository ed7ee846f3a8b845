"""cleanup: constant folding, Identity/Dropout removal, dead nodes, toposort."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from surgeon.export.passes.graph import is_graph_output
from surgeon.export.passes.rules import PassResult

_NOOPS = ("Identity", "Dropout")


def _bypass(graph: gs.Graph, node: gs.Node) -> bool:
    """Route ``node``'s consumers to its input; False when its output is a graph output."""
    src, out = node.inputs[0], node.outputs[0]
    if is_graph_output(graph, out):
        return False
    for consumer in list(out.outputs):
        consumer.inputs = [src if t is out else t for t in consumer.inputs]
    node.outputs.clear()
    return True


def _fold_constant_concats(graph: gs.Graph) -> list[str]:
    """Concat of constants (a grown consumer's old and new weight columns) folded with numpy: one
    copy, where onnx-graphsurgeon's general folding would serialize the tensors through ONNX Runtime."""
    folded = []
    for node in list(graph.nodes):
        if node.op != "Concat" or not node.inputs or not all(isinstance(t, gs.Constant) for t in node.inputs):
            continue
        out = node.outputs[0]
        if is_graph_output(graph, out):
            continue
        value = np.concatenate([t.values for t in node.inputs], axis=int(node.attrs.get("axis", 0)))
        const = gs.Constant(f"{out.name}_folded", value)
        for consumer in list(out.outputs):
            consumer.inputs = [const if t is out else t for t in consumer.inputs]
        node.outputs.clear()
        folded.append(node.name)
    return folded


def cleanup(graph: gs.Graph) -> PassResult:
    result = PassResult("cleanup")
    bypassed = 0
    for node in list(graph.nodes):
        if node.op in _NOOPS and (node.op != "Dropout" or len(node.outputs) == 1 or not node.outputs[1].outputs):
            if _bypass(graph, node):
                bypassed += 1
                result.changed.append((node.name, f"removed {node.op}"))
            else:
                result.skipped.append((node.name, f"{node.op} produces a graph output"))
    before = len(graph.nodes)
    graph.cleanup()
    # Fold what only depends on constants (e.g. Concat of a grown layer's old and new weights).
    folded = set(_fold_constant_concats(graph))
    graph.cleanup()
    folded_from = {n.name for n in graph.nodes if n.op != "Constant"}
    # Not inside GrowNorm's local function: the model keeps its own copy (export_graph), and the one
    # graph the passes share would otherwise be folded again, round after round.
    graph.fold_constants(error_ok=True, recurse_functions=False).cleanup()
    folded |= folded_from - {n.name for n in graph.nodes}
    if folded:
        result.changed.append(("constants", f"folded {len(folded)} constant node(s): {', '.join(sorted(folded)[:6])}{' ...' if len(folded) > 6 else ''}"))
    dead = before - len(graph.nodes) - bypassed - len(folded)
    if dead > 0:
        result.changed.append(("dead nodes", f"removed {dead} dead node(s)"))
    graph.toposort()
    return result
