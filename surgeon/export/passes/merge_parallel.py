"""merge-parallel: the old and new branches of a widened layer become one op.

Two Conv (or Gemm, or MatMul) nodes that read the same input with the same attributes and constant
weights, concatenated on channels, become one op with concatenated weights. The matching
Slice → BatchNormalization ×2 → Concat of a widened BatchNorm becomes one BatchNormalization.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from surgeon.export.passes.base import PassResult, constant_value, is_graph_output

_LINEAR = ("Conv", "Gemm", "MatMul")


def _out_axis(node: gs.Node) -> int:
    """The weight axis that indexes output channels."""
    if node.op == "Conv":
        return 0
    if node.op == "Gemm":
        return 0 if node.attrs.get("transB", 0) else 1
    return 1  # MatMul [in, out]


def _merge_linear(graph: gs.Graph, concat: gs.Node) -> str | None:
    producers = [t.inputs[0] if t.inputs else None for t in concat.inputs]
    if len(producers) < 2 or any(p is None or p.op not in _LINEAR for p in producers):
        return None
    first = producers[0]
    if any(p.op != first.op or p.inputs[0] is not first.inputs[0] or p.attrs != first.attrs for p in producers):
        return "branches differ in input, op or attributes"
    if any(len(t.outputs) != 1 or is_graph_output(graph, t) for t in concat.inputs):
        return "a branch output has other consumers or is a graph output"
    if first.op == "Conv" and first.attrs.get("group", 1) != 1:
        return "grouped Conv branches"
    weights = [constant_value(p.inputs[1]) for p in producers]
    if any(w is None for w in weights):
        return "a branch weight is not a constant"
    if first.op == "Gemm" and (first.attrs.get("transA", 0) or concat.attrs.get("axis") not in (1, -1)):
        return "Gemm output is not concatenated on features"
    if first.op == "Conv" and concat.attrs.get("axis") != 1:
        return "Conv outputs are not concatenated on channels"
    if first.op == "MatMul":
        out_shape = concat.outputs[0].shape
        rank = len(out_shape) if out_shape is not None else None
        if weights[0].ndim != 2 or rank is None or concat.attrs.get("axis") not in (-1, rank - 1):
            return "MatMul outputs are not concatenated on features"
    axis = _out_axis(first)
    rest = [w.shape[:axis] + w.shape[axis + 1:] for w in weights]
    if any(r != rest[0] for r in rest):
        return "branch weights differ in shape"
    weight = np.concatenate(weights, axis=axis)
    inputs = [first.inputs[0], gs.Constant(f"{first.name}_merged_weight", weight)]
    has_bias = [len(p.inputs) > 2 for p in producers]
    if any(has_bias):
        biases = []
        for p, w in zip(producers, weights):
            b = constant_value(p.inputs[2]) if len(p.inputs) > 2 else np.zeros(w.shape[axis], w.dtype)
            if b is None or b.size not in (1, w.shape[axis]) or (b.ndim == 2 and b.shape[0] != 1) or b.ndim > 2:
                return "a branch bias is not a per-output constant"
            biases.append(np.broadcast_to(b.reshape(-1), (w.shape[axis],)))  # Gemm biases may broadcast
        inputs.append(gs.Constant(f"{first.name}_merged_bias", np.concatenate(biases)))
    merged = gs.Node(first.op, f"{first.name}_merged", dict(first.attrs), inputs, list(concat.outputs))
    concat.outputs.clear()
    for p in producers:
        p.outputs.clear()
    graph.nodes.append(merged)
    return ""


def _merge_split_batchnorm(graph: gs.Graph, concat: gs.Node) -> str | None:
    bns = [t.inputs[0] if t.inputs else None for t in concat.inputs]
    if len(bns) < 2 or any(b is None or b.op != "BatchNormalization" for b in bns):
        return None
    slices = [b.inputs[0].inputs[0] if b.inputs[0].inputs else None for b in bns]
    if any(s is None or s.op != "Slice" for s in slices) or len({id(s.inputs[0]) for s in slices}) != 1:
        return "the BatchNorms do not read slices of one tensor"
    if concat.attrs.get("axis") != 1 or any(len(b.outputs) != 1 or len(b.outputs[0].outputs) != 1
                                            or is_graph_output(graph, b.outputs[0]) for b in bns):
        return "not a channel split"
    if any(len(b.inputs) < 5 for b in bns) or any(
            constant_value(b.inputs[i]) is None or np.ndim(constant_value(b.inputs[i])) != 1 for b in bns for i in range(1, 5)):
        # e.g. BatchNorms without running statistics, whose mean and variance come from the batch
        return "the BatchNorms' scale, bias, mean and variance are not constant per-channel vectors"
    # The slices must tile the channels in order: starts 0, c0, c0+c1, ... on axis 1.
    pos = 0
    for s in slices:
        starts, ends = constant_value(s.inputs[1]), constant_value(s.inputs[2])
        axes = constant_value(s.inputs[3]) if len(s.inputs) > 3 else None
        steps = constant_value(s.inputs[4]) if len(s.inputs) > 4 else None
        if starts is None or ends is None or axes is None or list(np.atleast_1d(axes)) != [1] or (steps is not None and list(steps) != [1]):
            return "a slice is not a constant channel range"
        size = constant_value(bns[slices.index(s)].inputs[1]).shape[0]
        if int(np.atleast_1d(starts)[0]) != pos or min(int(np.atleast_1d(ends)[0]), 2**62) < pos + size:
            return "the slices do not tile the channels in order"
        pos += size
    src_shape = slices[0].inputs[0].shape
    if not src_shape or len(src_shape) < 2 or src_shape[1] != pos:
        return "the slices do not cover all channels"
    if len({b.attrs.get("epsilon", 1e-5) for b in bns}) != 1:
        return "the BatchNorms have different epsilons"
    params = [np.concatenate([constant_value(b.inputs[i]) for b in bns]) for i in range(1, 5)]
    src = slices[0].inputs[0]
    names = ("scale", "bias", "mean", "var")
    merged = gs.Node("BatchNormalization", f"{bns[0].name}_merged", {"epsilon": bns[0].attrs.get("epsilon", 1e-5)},
                     [src] + [gs.Constant(f"{bns[0].name}_merged_{n}", p) for n, p in zip(names, params)],
                     list(concat.outputs))
    concat.outputs.clear()
    for b in bns:
        b.outputs.clear()
    graph.nodes.append(merged)
    return ""


def merge_parallel(graph: gs.Graph) -> PassResult:
    result = PassResult("merge-parallel")
    for concat in [n for n in graph.nodes if n.op == "Concat"]:
        if not concat.outputs or any(not t.inputs for t in concat.inputs):
            continue
        producers = ", ".join(t.inputs[0].name for t in concat.inputs)
        for rule, what in ((_merge_linear, "branches"), (_merge_split_batchnorm, "BatchNorm halves")):
            why = rule(graph, concat)
            if why is None:
                continue
            if why == "":
                result.changed.append((concat.name, f"merged {what} {producers} into one op"))
            else:
                result.skipped.append((f"{concat.name} ({producers})", why))
            break
    return result
