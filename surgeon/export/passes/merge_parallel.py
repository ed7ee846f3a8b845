"""merge-parallel: the old and new branches of a widened layer become one op.

Two Conv (or Gemm) nodes that read the same input with the same attributes and constant weights,
concatenated on channels, become one op with concatenated weights. The matching
Slice → BatchNormalization ×2 → Concat of a widened BatchNorm becomes one BatchNormalization.

A Linear on a rank ≥ 3 tensor (``[N, T, C]`` tokens, ``[N, H, W, C]`` channels-last) exports as
``MatMul(x, Wᵀ)`` then ``Add(bias)``: two or more such branches (each with or without its Add) that
read the same x and are concatenated on the last axis become one MatMul with the weights
concatenated along the output axis, then one Add with the biases concatenated (zeros for a branch
without one; no Add when no branch has a bias). Refused, with the reason: branches that read
different inputs, a Concat on another axis (e.g. tokens), a weight that is not a constant 2-D
initializer, an Add operand that is not a constant broadcast over the last dim only.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from surgeon.export.passes.graph import constant_value, is_graph_output
from surgeon.export.passes.rules import PassResult, Rewrite, concat_rule, concat_rule_pass

_LINEAR = ("Conv", "Gemm", "MatMul")


def _out_axis(node: gs.Node) -> int:
    """The weight axis that indexes output channels."""
    if node.op == "Conv":
        return 0
    return 0 if node.attrs.get("transB", 0) else 1  # Gemm


def _single_use(graph: gs.Graph, t: gs.Tensor) -> bool:
    return len(t.outputs) == 1 and not is_graph_output(graph, t)


def _matmul_branch(t: gs.Tensor) -> tuple[gs.Node, gs.Tensor | None, gs.Node | None] | None:
    """(MatMul, bias operand, Add) of one Concat input — ``MatMul`` alone or ``Add(MatMul, b)`` in
    either operand order — or None when the input is not a MatMul branch."""
    p = t.inputs[0] if t.inputs else None
    if p is None:
        return None
    if p.op == "MatMul" and len(p.inputs) == 2:
        return p, None, None
    if p.op == "Add" and len(p.inputs) == 2:
        for i, operand in enumerate(p.inputs):
            src = operand.inputs[0] if operand.inputs else None
            if src is not None and src.op == "MatMul" and len(src.inputs) == 2:
                return src, p.inputs[1 - i], p
    return None


def _known_rank(*tensors: gs.Tensor) -> int | None:
    for t in tensors:
        if t.shape is not None:
            return len(t.shape)
    return None


def _merge_matmul(graph: gs.Graph, concat: gs.Node) -> str | Rewrite | None:
    """MatMul(+Add) branches on one input concatenated on the last axis → one MatMul (+ one Add)."""
    branches = [_matmul_branch(t) for t in concat.inputs]
    if len(branches) < 2 or any(b is None for b in branches):
        return None
    mms = [mm for mm, _, _ in branches]
    if any(not _single_use(graph, t) for t in concat.inputs) or any(
            add is not None and not _single_use(graph, mm.outputs[0]) for mm, _, add in branches):
        return "a branch output has other consumers or is a graph output"
    x = mms[0].inputs[0]
    if any(mm.inputs[0] is not x for mm in mms):
        return "branches read different inputs"
    weights = [constant_value(mm.inputs[1]) for mm in mms]
    if any(w is None for w in weights):
        return "a branch weight is not a constant initializer"
    if any(w.ndim != 2 for w in weights):
        return "a branch weight is not a 2-D [in, out] matrix"
    rank = _known_rank(concat.outputs[0], *(mm.outputs[0] for mm in mms), x)
    axis = int(concat.attrs.get("axis", 0))
    if not (axis == -1 or (rank is not None and axis == rank - 1)):
        where = f"axis {axis} of rank {rank}" if rank is not None else f"axis {axis} of an unknown rank"
        return f"MatMul outputs are not concatenated on features (the last axis): {where}"
    if any(w.shape[0] != weights[0].shape[0] for w in weights) or len({w.dtype for w in weights}) != 1:
        return "branch weights differ in input size or type"
    biases = []
    for (mm, operand, add), w in zip(branches, weights):
        k = w.shape[1]
        if add is None:
            biases.append(None)
            continue
        b = constant_value(operand)
        if b is None:
            return f"an operand of Add {add.name} is not a constant (not a bias)"
        if b.ndim > (rank if rank is not None else 1) or any(d != 1 for d in b.shape[:-1]) or (b.ndim and b.shape[-1] not in (1, k)):
            return f"the constant of Add {add.name} ({list(b.shape)}) is not broadcast over the last dim only"
        biases.append(np.broadcast_to(b.reshape(-1).astype(w.dtype), (k,)))

    def rewrite() -> None:
        out = concat.outputs[0]
        first = mms[0]
        concat.outputs.clear()
        for mm, _, add in branches:
            mm.outputs.clear()
            if add is not None:
                add.outputs.clear()
        w_const = gs.Constant(f"{first.name}_merged_weight", np.concatenate(weights, axis=1))
        if all(b is None for b in biases):
            graph.nodes.append(gs.Node("MatMul", f"{first.name}_merged", {}, [x, w_const], [out]))
            return
        bias = np.concatenate([np.zeros(w.shape[1], w.dtype) if b is None else b for b, w in zip(biases, weights)])
        mid = gs.Variable(f"{first.name}_merged_out", dtype=out.dtype, shape=out.shape)
        graph.nodes.append(gs.Node("MatMul", f"{first.name}_merged", {}, [x, w_const], [mid]))
        graph.nodes.append(gs.Node("Add", f"{first.name}_merged_bias_add", {},
                                   [mid, gs.Constant(f"{first.name}_merged_bias", bias)], [out]))
    return rewrite


def _merge_linear(graph: gs.Graph, concat: gs.Node) -> str | Rewrite | None:
    producers = [t.inputs[0] if t.inputs else None for t in concat.inputs]
    if len(producers) < 2 or any(p is None or p.op not in _LINEAR for p in producers):
        return None
    first = producers[0]
    if any(p.op != first.op or p.inputs[0] is not first.inputs[0] or p.attrs != first.attrs for p in producers):
        return "branches differ in input, op or attributes"
    if first.op == "MatMul":
        return None  # all-MatMul branches are _merge_matmul's, which runs first
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
    axis = _out_axis(first)
    rest = [w.shape[:axis] + w.shape[axis + 1:] for w in weights]
    if any(r != rest[0] for r in rest):
        return "branch weights differ in shape"
    biases = []
    if any(len(p.inputs) > 2 for p in producers):
        for p, w in zip(producers, weights):
            b = constant_value(p.inputs[2]) if len(p.inputs) > 2 else np.zeros(w.shape[axis], w.dtype)
            if b is None or b.size not in (1, w.shape[axis]) or (b.ndim == 2 and b.shape[0] != 1) or b.ndim > 2:
                return "a branch bias is not a per-output constant"
            biases.append(np.broadcast_to(b.reshape(-1), (w.shape[axis],)))  # Gemm biases may broadcast

    def rewrite() -> None:
        inputs = [first.inputs[0], gs.Constant(f"{first.name}_merged_weight", np.concatenate(weights, axis=axis))]
        if biases:
            inputs.append(gs.Constant(f"{first.name}_merged_bias", np.concatenate(biases)))
        merged = gs.Node(first.op, f"{first.name}_merged", dict(first.attrs), inputs, list(concat.outputs))
        concat.outputs.clear()
        for p in producers:
            p.outputs.clear()
        graph.nodes.append(merged)
    return rewrite


def _merge_split_batchnorm(graph: gs.Graph, concat: gs.Node) -> str | Rewrite | None:
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

    def rewrite() -> None:
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
    return rewrite


RULES = [
    concat_rule(_merge_matmul, "merged branches {} into one op"),
    concat_rule(_merge_linear, "merged branches {} into one op"),
    concat_rule(_merge_split_batchnorm, "merged BatchNorm halves {} into one op"),
]
_pass = concat_rule_pass("merge-parallel", RULES)


def merge_parallel(graph: gs.Graph) -> PassResult:
    return _pass(graph)
