"""merge-grouped: grouped convs on consecutive channel slices, concatenated, become one grouped conv.

A widened depthwise (or other grouped) conv — EfficientNet/MobileNet's expansion widened, the
depthwise conv after it gets the new channels as new groups — exports as

    Slice(x, [a_0, a_1)) → Conv(group g_0) ┐
    Slice(x, [a_1, a_2)) → Conv(group g_1) ┴→ Concat(axis 1)

Where the slices tile x's channels in order and every branch has the same channels per group in
and out (and the same kernel, strides, pads, dilations), that is exactly one Conv on x with the
weights concatenated on the output axis, the biases too (zeros for a branch without one), and
``group = Σ g_i``: group j of the merged conv reads channels [j·c, (j+1)·c) and writes its own
outputs, which is what branch i's groups did at an offset of Σ_{k<i} g_k groups. No arithmetic
changes. Refused, with the reason: slices that do not tile the channels, different per-group
widths, other attributes, non-constant weights, branch outputs used elsewhere.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from surgeon.export.passes.graph import constant_value, is_graph_output
from surgeon.export.passes.rules import PassResult, Rewrite, concat_rule, concat_rule_pass

_SAME_ATTRS = ("kernel_shape", "strides", "pads", "dilations", "auto_pad")


def _channel_range(s: gs.Node) -> tuple[int, int] | None:
    """(start, end) of a constant Slice over axis 1 with step 1; None otherwise (end may be huge)."""
    values = [constant_value(t) for t in s.inputs[1:]]  # starts, ends, axes[, steps]
    if len(values) < 3 or any(v is None for v in values):
        return None
    starts, ends, axes, steps = (np.atleast_1d(v) for v in (values + [np.ones(1, np.int64)])[:4])
    if list(axes) != [1] or list(steps) != [1] or starts.size != 1 or ends.size != 1:
        return None
    return int(starts[0]), int(ends[0])


def _merge(graph: gs.Graph, concat: gs.Node) -> str | Rewrite | None:
    """None: not a candidate; the rewrite when it can merge; otherwise why not."""
    convs = [t.inputs[0] if t.inputs else None for t in concat.inputs]
    if len(convs) < 2 or any(c is None or c.op != "Conv" for c in convs):
        return None
    slices = [c.inputs[0].inputs[0] if c.inputs[0].inputs else None for c in convs]
    if any(s is None or s.op != "Slice" for s in slices):
        return None
    if any(c.attrs.get("group", 1) == 1 for c in convs):
        return None  # ungrouped convs on slices: not a widened grouped conv
    x = slices[0].inputs[0]
    if any(s.inputs[0] is not x for s in slices):
        return "the convs read slices of different tensors"
    if int(concat.attrs.get("axis", 0)) != 1:
        return "the conv outputs are not concatenated on channels (axis 1)"
    if any(len(t.outputs) != 1 or is_graph_output(graph, t) for t in concat.inputs):
        return "a branch output has other consumers or is a graph output"
    if any({k: c.attrs.get(k) for k in _SAME_ATTRS} != {k: convs[0].attrs.get(k) for k in _SAME_ATTRS} for c in convs):
        return "the convs differ in kernel, strides, pads, dilations or auto_pad"
    weights = [constant_value(c.inputs[1]) for c in convs]
    if any(w is None for w in weights):
        return "a branch weight is not a constant"
    channels = x.shape[1] if x.shape and len(x.shape) > 1 and isinstance(x.shape[1], int) else None
    if channels is None:
        return "the sliced tensor's channel count is unknown"
    pos = 0
    for s, c, w in zip(slices, convs, weights):
        rng = _channel_range(s)
        if rng is None:
            return f"Slice {s.name} is not a constant channel range (axis 1, step 1)"
        groups = int(c.attrs["group"])
        width = w.shape[1] * groups
        if rng[0] != pos or min(rng[1], channels) != pos + width or w.shape[0] % groups:
            return "the slices do not tile the channels in order"
        pos += width
    if pos != channels:
        return "the slices do not cover all channels"
    per_group_in = {w.shape[1] for w in weights}
    per_group_out = {w.shape[0] // int(c.attrs["group"]) for c, w in zip(convs, weights)}
    if len(per_group_in) != 1 or len(per_group_out) != 1:
        return "the branches differ in channels per group"
    if len({w.dtype for w in weights}) != 1 or len({w.shape[2:] for w in weights}) != 1:
        return "the branch weights differ in type or kernel size"
    biases = []
    if any(len(c.inputs) > 2 for c in convs):
        biases = [constant_value(c.inputs[2]) if len(c.inputs) > 2 else np.zeros(w.shape[0], w.dtype)
                  for c, w in zip(convs, weights)]
        if any(b is None or b.shape != (w.shape[0],) for b, w in zip(biases, weights)):
            return "a branch bias is not a constant per-output vector"

    def rewrite() -> None:
        inputs = [x, gs.Constant(f"{convs[0].name}_merged_weight", np.concatenate(weights, axis=0))]
        if biases:
            inputs.append(gs.Constant(f"{convs[0].name}_merged_bias", np.concatenate(biases)))
        attrs = dict(convs[0].attrs)
        attrs["group"] = sum(int(c.attrs["group"]) for c in convs)
        merged = gs.Node("Conv", f"{convs[0].name}_merged", attrs, inputs, list(concat.outputs))
        concat.outputs.clear()
        for c in convs:
            c.outputs.clear()
        graph.nodes.append(merged)
    return rewrite


RULES = [concat_rule(_merge, "merged grouped convs {} on channel slices into one conv")]
_pass = concat_rule_pass("merge-grouped", RULES)


def merge_grouped(graph: gs.Graph) -> PassResult:
    return _pass(graph)
