"""fold-gamma: move GrowNorm's per-channel scale γ into the next linear op.

y_c = γ_c·x̂_c feeds a Gemm/MatMul/Conv through ops that commute with a per-channel scale:
Dropout/Identity and average pooling always; ReLU, LeakyReLU and max pooling only for γ_c > 0
(max(γx, 0) = γ·max(x, 0) needs γ > 0); Flatten/Reshape repeat γ over each channel's positions. The
consumer's input columns are multiplied by γ and GrowNorm keeps a scale of 1 — or, for channels
whose γ cannot pass (γ ≤ 0 before a ReLU), keeps their γ and says so.

A GrowNorm with ``axis=-1`` on a rank ≥ 3 tensor (``[N, ..., C]``, tokens) has its channels last:
γ passes Dropout/Identity, ReLU/LeakyReLU (γ > 0), a ReduceMean that keeps the last axis and a
Reshape that keeps it, and folds into the rows of a MatMul's ``[C, out]`` weight (the MatMul
contracts the last axis: exactly the channels) or a Gemm's input columns after a ReduceMean to
``[N, C]``. Pools and Flatten/Conv read channels on dim 1 and are refused, saying so.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from surgeon.export.grownorm_op import DOMAIN, OP_TYPE
from surgeon.export.passes.graph import constant_value, is_graph_output
from surgeon.export.passes.rules import PassResult

_ALWAYS = {"Dropout", "Identity", "AveragePool", "GlobalAveragePool"}
_POSITIVE_ONLY = {"Relu", "LeakyRelu", "MaxPool", "GlobalMaxPool"}
_FLATTENS = {"Flatten", "Reshape"}
_LINEAR = {"Gemm", "MatMul", "Conv"}


def _channel_positions(src: gs.Tensor, dst: gs.Tensor) -> int | None:
    """How many flattened positions each channel spans after ``src`` → ``dst`` (channel-major)."""
    s, d = src.shape, dst.shape
    if not s or not d or len(d) != 2 or len(s) < 2 or not all(isinstance(v, int) for v in list(s[1:]) + [d[1]]):
        return None
    spatial = int(np.prod(s[2:])) if len(s) > 2 else 1
    return spatial if d[1] == s[1] * spatial else None


def _reduce_axes(node: gs.Node):
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1:
        axes = constant_value(node.inputs[1])
    return None if axes is None else [int(a) for a in np.atleast_1d(axes)]


def _reduce_mean_ok(node: gs.Node) -> bool:
    axes = _reduce_axes(node)
    return axes is not None and all(a >= 2 for a in axes)


def _rank(t: gs.Tensor) -> int | None:
    return None if t.shape is None else len(t.shape)


def channels_last(norm: gs.Node) -> tuple[bool, str]:
    """Whether the node's channels are its input's last axis at rank ≥ 3 (``axis=-1`` tokens), or
    why its axis cannot be placed. Axis -1 at rank 2 is dim 1: the channels-first rules hold."""
    axis = int(norm.attrs.get("axis", 1))
    if axis == 1:
        return False, ""
    rank = _rank(norm.inputs[0])
    if rank is None:
        return False, f"axis {axis}: the input's rank is unknown, so the channel axis cannot be placed"
    if axis % rank == 1:
        return False, ""
    if axis % rank == rank - 1:
        return True, ""
    return False, f"axis {axis}: the channels are neither dim 1 nor the last dim of the rank-{rank} input"


def _last_axis_step(node: gs.Node, cur: gs.Tensor) -> tuple[bool, str]:
    """For channels-last GrowNorm output: (needs γ > 0, why not) for passing ``node``."""
    if node.op in ("Dropout", "Identity"):
        return False, ""
    if node.op in ("Relu", "LeakyRelu"):
        return True, ""
    if node.op == "ReduceMean":
        axes, rank = _reduce_axes(node), _rank(cur)
        if axes is not None and rank is not None and all(a % rank != rank - 1 for a in axes):
            return False, ""
        return False, f"axis -1: ReduceMean {node.name} may reduce the channel (last) axis"
    if node.op in _FLATTENS:
        src, dst = cur.shape, node.outputs[0].shape
        if node.op == "Reshape" and src and dst and isinstance(src[-1], int) and src[-1] == dst[-1] and len(dst) >= 2:
            return False, ""  # the last axis (channels) is kept whole: γ stays per column
        return False, f"axis -1: {node.op} {node.name} does not keep the channel (last) axis"
    if node.op in _ALWAYS | _POSITIVE_ONLY:
        return False, f"axis -1: {node.op} {node.name} pools over dims 2+, which hold the channels"
    what = " (a residual branch)" if node.op in ("Add", "Sum") else ""
    return False, f"reaches {node.op} {node.name}{what}, which does not commute with a per-channel scale"


def _walk(norm: gs.Node, graph: gs.Graph, last: bool = False) -> tuple[gs.Node | None, gs.Tensor, list[str], int, bool, str]:
    """Follow GrowNorm's output to the consumer:
    (consumer, the tensor it reads, path ops, positions per channel, needs γ > 0, why not).
    ``last``: the channels are the last axis (axis -1 at rank ≥ 3)."""
    cur = norm.outputs[0]
    path: list[str] = []
    positions, positive = 1, False
    while True:
        if is_graph_output(graph, cur):
            return None, cur, path, positions, positive, "its output is a graph output"
        users = list(cur.outputs)
        if len(users) != 1:
            why = "its output is a graph output" if not users else f"its output has {len(users)} consumers ({', '.join(u.op for u in users)})"
            return None, cur, path, positions, positive, why
        node = users[0]
        if node.op in _LINEAR:
            if last and node.op == "Conv":
                return None, cur, path, positions, positive, f"axis -1: Conv {node.name} reads channels on dim 1, not the last axis"
            return node, cur, path, positions, positive, ""
        if last:
            needs_positive, why = _last_axis_step(node, cur)
            if why:
                return None, cur, path, positions, positive, why
            positive |= needs_positive
        elif node.op in _ALWAYS or (node.op == "ReduceMean" and _reduce_mean_ok(node)):
            pass
        elif node.op in _POSITIVE_ONLY:
            positive = True
        elif node.op in _FLATTENS:
            p = _channel_positions(cur, node.outputs[0])
            if p is None:
                return None, cur, path, positions, positive, f"{node.op} {node.name} does not flatten channel-major from dim 1"
            positions *= p
        else:
            what = " (a residual branch)" if node.op in ("Add", "Sum") else ""
            return None, cur, path, positions, positive, f"reaches {node.op} {node.name}{what}, which does not commute with a per-channel scale"
        path.append(node.op)
        cur = node.outputs[0]


def _scale_consumer(consumer: gs.Node, src: gs.Tensor, scale: np.ndarray, positions: int, last: bool = False) -> str | None:
    """Multiply the consumer's input columns by ``scale`` (repeated per position); None or why not.
    ``last``: the channels are ``src``'s last axis, which a MatMul contracts whatever the rank."""
    if not consumer.inputs or consumer.inputs[0] is not src:
        return f"{consumer.op} {consumer.name} reads it as a weight, not as its input"
    weight = constant_value(consumer.inputs[1]) if len(consumer.inputs) > 1 else None
    if weight is None:
        return f"the weight of {consumer.op} {consumer.name} is not a constant"
    cols = np.repeat(scale, positions).astype(weight.dtype)
    if consumer.op == "Gemm":
        if consumer.attrs.get("transA", 0):
            return f"Gemm {consumer.name} transposes its input"
        axis = 1 if consumer.attrs.get("transB", 0) else 0
    elif consumer.op == "MatMul":
        if weight.ndim != 2:
            return f"MatMul {consumer.name} has a {weight.ndim}-D weight"
        if last and src.shape is not None and len(src.shape) >= 2:
            pass  # y = x·W contracts x's last axis (the channels) with W's rows
        elif src.shape is None or len(src.shape) != 2:
            rank = "unknown-rank" if src.shape is None else f"rank-{len(src.shape)}"
            return f"MatMul {consumer.name} contracts the last axis of a {rank} input, not the channels"
        axis = 0
    else:
        if consumer.attrs.get("group", 1) != 1:
            return f"Conv {consumer.name} is grouped"
        axis = 1
    if weight.shape[axis] != cols.size:
        return f"{consumer.op} {consumer.name} reads {weight.shape[axis]} inputs, not {cols.size}"
    shape = [1] * weight.ndim
    shape[axis] = -1
    # Named after the node: two consumers may share one weight tensor.
    consumer.inputs[1] = gs.Constant(f"{consumer.name}_{consumer.inputs[1].name}_gamma_folded", (weight * cols.reshape(shape)).astype(weight.dtype, copy=False))
    return None


def fold_gamma(graph: gs.Graph) -> PassResult:
    result = PassResult("fold-gamma")
    for norm in [n for n in graph.nodes if n.op == OP_TYPE and n.domain == DOMAIN]:
        gamma = constant_value(norm.inputs[1]) if len(norm.inputs) > 1 else None
        if gamma is None:
            result.skipped.append((norm.name, "γ is not a constant"))
            continue
        if np.all(gamma == 1):
            result.skipped.append((norm.name, "no scale left to fold (γ = 1)"))
            continue
        last, why = channels_last(norm)
        if why:
            result.skipped.append((norm.name, why))
            continue
        consumer, feed, path, positions, positive, why = _walk(norm, graph, last)
        if consumer is None:
            result.skipped.append((norm.name, why))
            continue
        foldable = gamma > 0 if positive else np.ones_like(gamma, dtype=bool)
        foldable &= gamma != 1
        if not foldable.any():
            result.skipped.append((norm.name, f"no channel has γ > 0 to pass {'/'.join(p for p in path if p in _POSITIVE_ONLY)}"))
            continue
        moved = np.where(foldable, gamma, 1).astype(gamma.dtype)
        why_not = _scale_consumer(consumer, feed, moved, positions, last)
        if why_not:
            result.skipped.append((norm.name, why_not))
            continue
        norm.inputs[1] = gs.Constant(f"{norm.name}_gamma_residual", np.where(foldable, 1, gamma).astype(gamma.dtype))
        through = f" through {', '.join(path)}" if path else ""
        result.changed.append((norm.name, f"γ of {int(foldable.sum())}/{gamma.size} channels folded into {consumer.op} {consumer.name}{through}"))
        kept = int((~foldable & (gamma != 1)).sum())
        if kept:
            result.skipped.append((norm.name, f"{kept} channel(s) with γ ≤ 0 keep their scale: it cannot pass {'/'.join(p for p in path if p in _POSITIVE_ONLY)}"))
    return result

