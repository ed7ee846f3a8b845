"""GrowNorm as one ONNX node with a model-local function (DESIGN.md §2).

- In PyTorch, ``torch.ops.surgeon.grow_norm`` (defined in :mod:`surgeon.grow.grownorm`) is a
  custom op that ``torch.export`` keeps as one node; ``GrowNorm`` calls it only while exporting
  (training keeps the differentiable composite).
- The ONNX exporter translates it to a ``GrowNorm`` node in domain ``surgeon`` with attributes
  ``groups``, ``eps``, ``plugin_namespace="surgeon"``, ``plugin_version="1"``.
- :func:`grownorm_function` is the local ONNX function ``surgeon.GrowNorm``: the same computation in
  standard ops, reading ``groups`` and ``eps`` through attribute references, so one function serves
  every node whatever its split and rank. ONNX Runtime runs it; TensorRT's parser uses it when the
  ``GrowNorm`` plugin is not registered.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import onnx
from onnx import helper
from onnx.defs import OpSchema

DOMAIN = "surgeon"
OP_TYPE = "GrowNorm"
PLUGIN_NAMESPACE = "surgeon"
PLUGIN_VERSION = "1"
FUNCTION_OPSET = 18   # the standard-op opset the function body is written against


@contextlib.contextmanager
def registered_schema() -> Iterator[None]:
    """Teach onnx the node's signature while torch.onnx translates to it. Outside export the schema
    is removed again, so onnx's checker and shape inference use the model-local function (which
    also infers the output shape; a bare schema would not)."""
    A = OpSchema.AttrType
    schema = OpSchema(
        OP_TYPE, DOMAIN, 1,
        doc="Grouped L2 normalization over dim 1 with a per-channel scale (surgeon).",
        inputs=[OpSchema.FormalParameter("X", "T"), OpSchema.FormalParameter("gamma", "T")],
        outputs=[OpSchema.FormalParameter("Y", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"], "float tensors")],
        attributes=[
            OpSchema.Attribute("groups", A.INTS, "channels per group, summing to C"),
            OpSchema.Attribute("eps", A.FLOAT, "lower bound of each group's norm"),
            OpSchema.Attribute("plugin_namespace", A.STRING, "TensorRT plugin namespace"),
            OpSchema.Attribute("plugin_version", A.STRING, "TensorRT plugin version"),
        ],
    )
    onnx.defs.register_schema(schema)
    try:
        yield
    finally:
        onnx.defs.deregister_schema(OP_TYPE, 1, DOMAIN)


def onnx_translation(x, gamma, groups, eps):
    """``custom_translation_table`` entry for ``torch.ops.surgeon.grow_norm``."""
    import onnxscript

    opset = onnxscript.values.Opset(DOMAIN, 1)
    return opset.GrowNorm(x, gamma, groups=list(groups), eps=float(eps),
                          plugin_namespace=PLUGIN_NAMESPACE, plugin_version=PLUGIN_VERSION)


def grownorm_function() -> onnx.FunctionProto:
    """``surgeon.GrowNorm(X, gamma)`` in opset-18 ops, for any rank ≥ 2 and any split.

    Membership matrix M[c, g] = (start_g <= c < end_g) from the ``groups`` attribute; then
    S = Σ_c X²·M (per sample, position and group), Y = X · (M · max(S, eps²)^-½) · γ.
    Reductions run in the input's type; fp16 graphs cast to fp32 around the node (see passes).
    """
    def node(op: str, inputs: list[str], outputs: list[str], **attrs) -> onnx.NodeProto:
        # Inner names are prefixed so they never clash with graph node names (TensorRT warns on duplicates).
        return helper.make_node(op, inputs, outputs, name=f"surgeon_GrowNorm_{outputs[0]}", **attrs)

    def ref(name: str, attr: str, typ: int) -> onnx.AttributeProto:
        a = onnx.AttributeProto()
        a.name, a.ref_attr_name, a.type = name, attr, typ
        return a

    sizes = node("Constant", [], ["sizes"])
    sizes.attribute.append(ref("value_ints", "groups", onnx.AttributeProto.INTS))
    eps = node("Constant", [], ["eps_f"])
    eps.attribute.append(ref("value_float", "eps", onnx.AttributeProto.FLOAT))
    nodes = [
        sizes,
        node("Constant", [], ["zero"], value=helper.make_tensor("zero", onnx.TensorProto.INT64, [], [0])),
        node("Constant", [], ["one"], value=helper.make_tensor("one", onnx.TensorProto.INT64, [], [1])),
        node("Constant", [], ["axis1"], value=helper.make_tensor("axis1", onnx.TensorProto.INT64, [1], [1])),
        node("CumSum", ["sizes", "zero"], ["ends"]),
        node("Sub", ["ends", "sizes"], ["starts"]),
        node("ReduceSum", ["sizes"], ["total"], keepdims=0),
        node("Range", ["zero", "total", "one"], ["channel"]),
        node("Unsqueeze", ["channel", "axis1"], ["channel_col"]),               # [C, 1]
        node("GreaterOrEqual", ["channel_col", "starts"], ["after_start"]),     # [C, G]
        node("Less", ["channel_col", "ends"], ["before_end"]),
        node("And", ["after_start", "before_end"], ["member_b"]),
        node("CastLike", ["member_b", "X"], ["member"]),
        eps,
        node("CastLike", ["eps_f", "X"], ["eps_x"]),
        node("Mul", ["eps_x", "eps_x"], ["eps_sq"]),
        node("Mul", ["X", "X"], ["x_sq"]),
        node("Einsum", ["x_sq", "member"], ["group_sq"], equation="nc...,cg->ng..."),
        node("Max", ["group_sq", "eps_sq"], ["group_sq_safe"]),
        node("Sqrt", ["group_sq_safe"], ["group_norm"]),
        node("Reciprocal", ["group_norm"], ["group_inv"]),
        node("Einsum", ["group_inv", "member"], ["channel_inv"], equation="ng...,cg->nc..."),
        node("Mul", ["X", "channel_inv"], ["x_hat"]),
        node("Einsum", ["x_hat", "gamma"], ["Y"], equation="nc...,c->nc..."),
    ]
    return helper.make_function(
        DOMAIN, OP_TYPE, ["X", "gamma"], ["Y"], nodes,
        opset_imports=[helper.make_opsetid("", FUNCTION_OPSET)],
        attributes=["groups", "eps", "plugin_namespace", "plugin_version"],
    )
