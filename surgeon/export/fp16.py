"""fp16 graphs for strongly typed runtimes (TensorRT 11 takes precision from the graph).

Weights and activations become fp16; the model's input and output stay fp32 (a Cast at each
edge, so callers feed the same arrays); every GrowNorm runs in fp32 — its input is cast up, γ stays
fp32, its output is cast back — so the group norms are accumulated in fp32 and eps² (1e-12) does
not underflow to 0.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from surgeon.export.grownorm_op import DOMAIN, OP_TYPE
from surgeon.export.lean import LeanModel

FP16_TOLERANCE = 1e-2   # relative to the logits' scale; fp16 keeps ~3 significant digits


def _is_grownorm(node: onnx.NodeProto) -> bool:
    return node.op_type == OP_TYPE and node.domain == DOMAIN


def to_fp16(model: LeanModel) -> LeanModel:
    """The fp16 graph; fp32 weights become fp16 copies (the fp32 arrays are not modified)."""
    out = onnx.ModelProto()
    out.CopyFrom(model.proto)  # the graph only: the weights are beside it
    graph = out.graph
    keep_fp32 = {n.input[1] for n in graph.node if _is_grownorm(n) and len(n.input) > 1}
    for init in graph.initializer:
        if init.data_type == TensorProto.FLOAT and init.name not in keep_fp32:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name))
    weights = {name: a.astype(np.float16) if a.dtype == np.float32 and name not in keep_fp32 else a
               for name, a in model.weights.items()}
    for declared in graph.input:
        if declared.name in weights:
            declared.type.tensor_type.elem_type = helper.np_dtype_to_tensor_dtype(weights[declared.name].dtype)

    inputs = {i.name for i in graph.input if i.type.tensor_type.elem_type == TensorProto.FLOAT and i.name not in weights}
    outputs = {o.name for o in graph.output if o.type.tensor_type.elem_type == TensorProto.FLOAT}
    nodes: list[onnx.NodeProto] = [helper.make_node("Cast", [name], [f"{name}_fp16"], to=TensorProto.FLOAT16,
                                                    name=f"surgeon_cast_{name}_fp16") for name in sorted(inputs)]
    for src in graph.node:
        node = onnx.NodeProto()
        node.CopyFrom(src)
        node.input[:] = [f"{x}_fp16" if x in inputs else x for x in node.input]
        node.output[:] = [f"{y}_fp16" if y in outputs else y for y in node.output]
        for attr in node.attribute:
            if attr.name == "to" and attr.i == TensorProto.FLOAT and node.op_type == "Cast":
                attr.i = TensorProto.FLOAT16
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT:
                attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float16), attr.t.name))
        if _is_grownorm(node):
            x, y = node.input[0], node.output[0]
            nodes.append(helper.make_node("Cast", [x], [f"{x}_fp32"], to=TensorProto.FLOAT, name=f"surgeon_cast_{x}_fp32"))
            node.input[0], node.output[0] = f"{x}_fp32", f"{y}_fp32"
            nodes.append(node)
            nodes.append(helper.make_node("Cast", [f"{y}_fp32"], [y], to=TensorProto.FLOAT16, name=f"surgeon_cast_{y}_fp16"))
            continue
        nodes.append(node)
    nodes += [helper.make_node("Cast", [f"{name}_fp16"], [name], to=TensorProto.FLOAT, name=f"surgeon_cast_{name}_fp32")
              for name in sorted(outputs)]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]
    return LeanModel(out, weights)
