"""GrowNorm as one ONNX node with a model-local function (DESIGN.md §2).

- In PyTorch, ``torch.ops.surgeon.grow_norm`` (defined in :mod:`surgeon.grow.grownorm`) is a
  custom op that ``torch.export`` keeps as one node; ``GrowNorm`` calls it only while exporting
  (training keeps the differentiable composite).
- The ONNX exporter translates it to a ``GrowNorm`` node in domain ``surgeon`` with attributes
  ``groups``, ``eps``, ``plugin_namespace="surgeon"``, ``plugin_version="1"``, and ``axis`` (the
  channel axis, 1 or -1) only where it is not 1: a node without it means axis 1, so files written
  before ``axis`` existed keep their meaning, and axis-1 nodes are written exactly as before.
- :func:`grownorm_function` is the local ONNX function ``surgeon.GrowNorm``: the same computation in
  standard ops, reading ``groups``, ``eps`` and ``axis`` through attribute references (``axis``
  with a default of 1 in the function's ``attribute_proto``), so one function serves every node
  whatever its split, rank and axis. ONNX Runtime runs it; TensorRT's parser uses it when the
  ``GrowNorm`` plugin is not registered.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import onnx
from onnx import helper
from onnx.defs import OpSchema

from surgeon.contract import DOMAIN, OP_TYPE, PLUGIN_NAMESPACE, PLUGIN_VERSION  # noqa: F401  (re-exported)

FUNCTION_OPSET = 18   # the standard-op opset the function body is written against
BLOCK_CAP = 64        # largest channel block f (a power of two) the body uses where S = 1


@contextlib.contextmanager
def registered_schema() -> Iterator[None]:
    """Teach onnx the node's signature while torch.onnx translates to it. Outside export the schema
    is removed again, so onnx's checker and shape inference use the model-local function (which
    also infers the output shape; a bare schema would not)."""
    A = OpSchema.AttrType
    schema = OpSchema(
        OP_TYPE, DOMAIN, 1,
        doc="Grouped L2 normalization over the channel axis (1 or -1) with a per-channel scale (surgeon).",
        inputs=[OpSchema.FormalParameter("X", "T"), OpSchema.FormalParameter("gamma", "T")],
        outputs=[OpSchema.FormalParameter("Y", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"], "float tensors")],
        attributes=[
            OpSchema.Attribute("groups", A.INTS, "channels per group, summing to C"),
            OpSchema.Attribute("eps", A.FLOAT, "lower bound of each group's norm"),
            # optional without a schema default: the exporter would write a default into every node,
            # and axis-1 nodes must stay as files written before axis existed (absent = 1)
            OpSchema.Attribute("axis", A.INT, "channel axis: 1 ([N, C, ...], also when absent) or -1 ([N, ..., C])",
                               required=False),
            OpSchema.Attribute("plugin_namespace", A.STRING, "TensorRT plugin namespace"),
            OpSchema.Attribute("plugin_version", A.STRING, "TensorRT plugin version"),
        ],
    )
    onnx.defs.register_schema(schema)
    try:
        yield
    finally:
        onnx.defs.deregister_schema(OP_TYPE, 1, DOMAIN)


def onnx_translation(x, gamma, groups, eps, axis=1):
    """``custom_translation_table`` entry for ``torch.ops.surgeon.grow_norm``."""
    import onnxscript

    opset = onnxscript.values.Opset(DOMAIN, 1)
    # axis only where it is not 1: axis-1 nodes stay exactly as files written before axis existed.
    extra = {} if int(axis) == 1 else {"axis": int(axis)}
    return opset.GrowNorm(x, gamma, groups=list(groups), eps=float(eps),
                          plugin_namespace=PLUGIN_NAMESPACE, plugin_version=PLUGIN_VERSION, **extra)


def grownorm_function() -> onnx.FunctionProto:
    """``surgeon.GrowNorm(X, gamma)`` in opset-18 ops, for any rank ≥ 2, any split and channel axis.

    ``Flatten(X, axis=<ref axis>)`` gives ``[P, C·S]`` for either axis (axis 1: P = N, S = the
    spatial size; axis -1: P = N·…, S = 1), reshaped to ``[P, C/f, f, S]``. Flatten's own default
    axis is 1, so a node without ``axis`` means axis 1 even where a consumer ignores the function's
    declared default (onnx's inliner does). The block size f is 1 where S > 1 (convolutions: the
    layout is ``[P, C, S]`` as before) and, where S = 1, the largest power of two up to
    ``BLOCK_CAP`` dividing every group size (computed from ``groups``; 1 if one is odd). With
    M[g, c] = (start_g <= c < end_g): S_g = ReduceSum over C/f, then over f, of X²[P, 1, C/f, f, S]
    · M[G, C/f, f, 1] → ``[P, G, S]``, and Y = X · Gather_1(max(S, eps²)^-½, group_of_block) · γ,
    the gathered ``[P, C/f, 1, S]`` broadcast over f (f divides every group boundary, so each block
    of f channels lies in one group). Each group sum adds exact zeros for the other groups'
    channels, so a tiny new group beside a large old one loses nothing (no difference of running
    sums, no matrix multiply that a GPU builder may run in TF32); Gather copies each group's scale
    without arithmetic. The blocks matter in ONNX Runtime, whose reduction over an axis followed
    only by size-1 axes, and whose Gather with a one-element inner block, run element by element
    (5-7x slower for tokens). Reductions run in the input's type; fp16 graphs cast to fp32 around
    the node (see passes).
    """
    def node(op: str, inputs: list[str], outputs: list[str], **attrs) -> onnx.NodeProto:
        # Inner names are prefixed so they never clash with graph node names (TensorRT warns on duplicates).
        return helper.make_node(op, inputs, outputs, name=f"surgeon_GrowNorm_{outputs[0]}", **attrs)

    def ref(name: str, attr: str, typ: int) -> onnx.AttributeProto:
        a = onnx.AttributeProto()
        a.name, a.ref_attr_name, a.type = name, attr, typ
        return a

    def int64(name: str, values: list[int]) -> onnx.NodeProto:
        dims = [] if name in ("zero", "one") else [len(values)]  # scalars for CumSum/Range, 1-D axes otherwise
        return node("Constant", [], [name], value=helper.make_tensor(name, onnx.TensorProto.INT64, dims, values))

    sizes = node("Constant", [], ["sizes"])
    sizes.attribute.append(ref("value_ints", "groups", onnx.AttributeProto.INTS))
    eps = node("Constant", [], ["eps_f"])
    eps.attribute.append(ref("value_float", "eps", onnx.AttributeProto.FLOAT))
    flat = node("Flatten", ["X"], ["x_flat"])
    flat.attribute.append(ref("axis", "axis", onnx.AttributeProto.INT))
    nodes = [
        int64("zero", [0]),
        int64("one", [1]),
        int64("i0", [0]),
        int64("i1", [1]),
        int64("i2", [2]),
        # group sizes → total C, membership M[g, c], each channel's group index (exact integers)
        sizes,
        node("CumSum", ["sizes", "zero"], ["ends"]),
        node("Sub", ["ends", "sizes"], ["starts"]),
        node("ReduceSum", ["sizes"], ["total"], keepdims=0),
        node("Unsqueeze", ["total", "i0"], ["total_1d"]),
        node("Range", ["zero", "total", "one"], ["channel"]),
        node("Unsqueeze", ["channel", "i1"], ["channel_col"]),                   # [C, 1]
        node("Unsqueeze", ["starts", "i1"], ["starts_col"]),                     # [G, 1]
        node("Unsqueeze", ["ends", "i1"], ["ends_col"]),
        node("GreaterOrEqual", ["channel", "starts_col"], ["after_start"]),      # [G, C]
        node("Less", ["channel", "ends_col"], ["before_end"]),
        node("And", ["after_start", "before_end"], ["member_b"]),
        node("CastLike", ["member_b", "X"], ["member"]),
        node("GreaterOrEqual", ["channel_col", "ends"], ["past_end_b"]),         # [C, G]: groups ending at or before c
        node("Cast", ["past_end_b"], ["past_end"], to=onnx.TensorProto.INT64),
        node("ReduceSum", ["past_end", "i1"], ["group_of_channel"], keepdims=0),    # [C]
        # block size f: the largest power of two up to BLOCK_CAP dividing every group size, used only
        # where S = 1 (tokens, [N, C] features); f = 1 otherwise, which leaves convolutions as before
        int64("block_cands", [2 ** (i + 1) for i in range(BLOCK_CAP.bit_length() - 1)]),
        int64("block_steps", [2 ** i for i in range(BLOCK_CAP.bit_length() - 1)]),
        node("Unsqueeze", ["block_cands", "i1"], ["block_cands_col"]),         # [K, 1]
        node("Div", ["sizes", "block_cands_col"], ["size_div"]),                # [K, G]
        node("Mul", ["size_div", "block_cands_col"], ["size_floor"]),
        node("Equal", ["size_floor", "sizes"], ["divides_b"]),
        node("Cast", ["divides_b"], ["divides"], to=onnx.TensorProto.INT64),
        node("ReduceSum", ["divides", "i1"], ["divided_groups"], keepdims=0),    # [K]
        node("Shape", ["sizes"], ["groups_1d"]),
        node("Equal", ["divided_groups", "groups_1d"], ["divides_all_b"]),
        node("Cast", ["divides_all_b"], ["divides_all"], to=onnx.TensorProto.INT64),
        node("Mul", ["divides_all", "block_steps"], ["block_bits"]),
        node("ReduceSum", ["block_bits", "i0"], ["block_m1"], keepdims=1),       # f - 1 (nested divisibility)
        node("Add", ["block_m1", "i1"], ["block_any"]),
        # X as [P, C/f, f, S], whichever axis holds the channels
        flat,                                                                    # [P, C*S]
        node("Shape", ["x_flat"], ["flat_shape"]),
        node("Slice", ["flat_shape", "i0", "i1"], ["rows_1d"]),
        node("Slice", ["flat_shape", "i1", "i2"], ["cols_1d"]),
        node("Div", ["cols_1d", "total_1d"], ["positions_1d"]),
        node("LessOrEqual", ["positions_1d", "i1"], ["single_b"]),
        node("Cast", ["single_b"], ["single"], to=onnx.TensorProto.INT64),
        node("Mul", ["block_any", "single"], ["block_or_0"]),
        node("Max", ["block_or_0", "i1"], ["block"]),                            # f
        node("Div", ["total_1d", "block"], ["blocks"]),                          # C/f
        node("Concat", ["rows_1d", "blocks", "block", "positions_1d"], ["shape_4d"], axis=0),
        node("Reshape", ["x_flat", "shape_4d"], ["x4"]),                         # [P, C/f, f, S]
        # per group and position: 1 / max(‖x_g‖, eps)
        eps,
        node("CastLike", ["eps_f", "X"], ["eps_x"]),
        node("Mul", ["eps_x", "eps_x"], ["eps_sq"]),
        node("Mul", ["x4", "x4"], ["x_sq"]),
        # groups before channels: each (p, g) sums one contiguous block; where S = 1 the first sum runs
        # over C/f with f contiguous partial sums kept (ONNX Runtime's reduction is an order of
        # magnitude slower over an axis followed only by a size-1 one), the second over those f
        node("Unsqueeze", ["x_sq", "i1"], ["x_sq_5d"]),                          # [P, 1, C/f, f, S]
        node("Concat", ["groups_1d", "blocks", "block", "i1"], ["member_shape"], axis=0),
        node("Reshape", ["member", "member_shape"], ["member_4d"]),              # [G, C/f, f, 1]
        node("Mul", ["x_sq_5d", "member_4d"], ["x_sq_groups"]),                  # [P, G, C/f, f, S]
        node("ReduceSum", ["x_sq_groups", "i2"], ["part_sq"], keepdims=0),       # [P, G, f, S]
        node("ReduceSum", ["part_sq", "i2"], ["group_sq"], keepdims=0),          # [P, G, S]
        node("Max", ["group_sq", "eps_sq"], ["group_sq_safe"]),
        node("Sqrt", ["group_sq_safe"], ["group_norm"]),
        node("Reciprocal", ["group_norm"], ["group_inv"]),
        # f divides every group boundary, so each block of f channels has one group: gather per block
        node("Concat", ["blocks", "block"], ["block_shape"], axis=0),
        node("Reshape", ["group_of_channel", "block_shape"], ["group_of_block_2d"]),  # [C/f, f]
        node("Slice", ["group_of_block_2d", "i0", "i1", "i1"], ["group_of_block"]),  # [C/f, 1]
        node("Gather", ["group_inv", "group_of_block"], ["block_inv"], axis=1),  # [P, C/f, 1, S]
        node("Mul", ["x4", "block_inv"], ["x_hat"]),                             # broadcast over f
        node("Concat", ["blocks", "block", "i1"], ["gamma_shape"], axis=0),
        node("Reshape", ["gamma", "gamma_shape"], ["gamma_3d"]),                 # [C/f, f, 1]
        node("Mul", ["x_hat", "gamma_3d"], ["y4"]),
        node("Shape", ["X"], ["x_shape"]),
        node("Reshape", ["y4", "x_shape"], ["Y"]),
    ]
    fn = helper.make_function(
        DOMAIN, OP_TYPE, ["X", "gamma"], ["Y"], nodes,
        opset_imports=[helper.make_opsetid("", FUNCTION_OPSET)],
        attributes=["groups", "eps", "plugin_namespace", "plugin_version"],
    )
    # axis is optional with default 1 (a node without it is an axis-1 node), declared the ONNX way;
    # the body does not depend on consumers applying it (see Flatten above).
    fn.attribute_proto.append(helper.make_attribute("axis", 1))
    return fn
