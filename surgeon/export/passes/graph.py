"""The one IR the passes work on: an onnx-graphsurgeon graph, imported once per pipeline.

Why onnx-graphsurgeon and not onnx_ir throughout: every pass (and its tests) is written against
gs's linked nodes and tensors (a tensor's producer and consumers, constants holding numpy arrays),
and measuring the grown-VGG16 surgery showed the conversions themselves cost ~0.2 s of ~40 s. What
made the old per-pass round trip expensive was its side effects: a fresh cyclic gs.Graph per pass
needing a full ``gc.collect()`` (~0.4 s each with torch's heap, 12 per export) and a full ONNX
Runtime verification per pass. So the pipeline imports the LeanModel once (the exporter's onnx_ir
model is serialized once, without its weights, in ``LeanModel.from_ir``), keeps that graph through
every pass and round, and exports a LeanModel only where a proto is needed (verification after a
pass, the result) — a small proto whose weights are the graph's own arrays, never copies.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.logger import G_LOGGER

from surgeon.export.lean import LeanModel, is_weight

# The passes report what they do; onnx-graphsurgeon's own warnings (colors, folding sizes) are noise here.
G_LOGGER.severity = G_LOGGER.ERROR


def constant_value(t: gs.Tensor) -> np.ndarray | None:
    """The array of a constant tensor, None for anything computed at run time."""
    return t.values if isinstance(t, gs.Constant) else None


def is_graph_output(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(tensor is t for t in graph.outputs)


def lean_of(model: LeanModel | onnx.ModelProto) -> LeanModel:
    return model if isinstance(model, LeanModel) else LeanModel.from_proto(model)


def _inferred(lean: LeanModel) -> onnx.ModelProto:
    try:
        return lean.infer_shapes()
    except Exception:
        return lean.proto  # shapes help the passes; without them a pass skips what it cannot prove


def import_graph(model: LeanModel | onnx.ModelProto) -> gs.Graph:
    """gs.Graph with inferred shapes (passes read spatial sizes from them). The weights become
    constants holding the very same arrays: nothing is copied."""
    lean = lean_of(model)
    graph = gs.import_onnx(_inferred(lean))
    tensors = graph.tensors()
    for name, array in lean.weights.items():
        if name in tensors:
            tensors[name].to_constant(array)
    graph.inputs = [t for t in graph.inputs if t.name not in lean.weights]
    return graph


def refresh_shapes(graph: gs.Graph, model: LeanModel) -> None:
    """Give the graph's variables of unknown shape what shape inference finds on ``model`` (the
    graph just exported): an edit can make a shape inferable (a folded shape constant), and the next
    pass on the same graph should see it as a fresh import would."""
    unknown = {t.name: t for t in graph.tensors().values()
               if isinstance(t, gs.Variable) and (t.shape is None or t.dtype is None)}
    if not unknown:
        return
    for vi in _inferred(model).graph.value_info:
        t = unknown.get(vi.name)
        if t is None or not vi.type.HasField("tensor_type"):
            continue
        tt = vi.type.tensor_type
        if t.dtype is None and tt.elem_type:
            t.dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if t.shape is None and tt.HasField("shape"):
            t.shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]


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
