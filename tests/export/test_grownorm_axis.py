"""GrowNorm's channel ``axis`` in ONNX (DESIGN.md §2): the node attribute (absent = 1), the one shared
local function against float64 numpy in ONNX Runtime and ONNX's reference evaluator, files written
before ``axis`` existed, the torch export of a token model, and the graph passes on axis -1 graphs.

ONNX's reference evaluator (onnx 1.23) neither applies a function's ``attribute_proto`` defaults nor
runs a function node that lacks a declared attribute, and its Flatten does not take attribute
references; it evaluates the model after ``onnx.inliner.inline_local_functions`` (which drops a
reference to an absent attribute, so the inner Flatten takes its own default axis of 1).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx.inliner
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator
from torch import nn

from surgeon.export import grownorm_op
from surgeon.export.grownorm_op import DOMAIN, grownorm_function
from surgeon.export.onnx_export import BatchRange, to_onnx
from surgeon.export.passes import default_passes
from surgeon.export.passes.base import PassManager, import_graph
from surgeon.export.passes.fold_gamma import fold_gamma
from surgeon.export.passes.merge_parallel import merge_parallel
from surgeon.grow.grownorm import GrowNorm

EPS = 1e-6
ONNX_TYPE = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16}


def reference(x: np.ndarray, groups, gamma: np.ndarray, eps: float = EPS, axis: int = 1) -> np.ndarray:
    """GrowNorm in float64 numpy, channels moved last."""
    a = np.moveaxis(x.astype(np.float64), axis, -1)
    out = np.empty_like(a)
    start = 0
    for g in groups:
        part = a[..., start:start + g]
        out[..., start:start + g] = part / np.maximum(np.sqrt((part * part).sum(-1, keepdims=True)), eps)
        start += g
    return np.moveaxis(out * gamma.astype(np.float64), -1, axis)


def grownorm_node(inputs, output, groups, axis=None, name="gn"):
    extra = {} if axis is None else {"axis": axis}
    return helper.make_node("GrowNorm", inputs, [output], name=name, domain=DOMAIN, groups=list(groups), eps=EPS,
                            plugin_namespace="surgeon", plugin_version="1", **extra)


def single_node_model(shape, groups, axis, dtype=np.float32, function=None) -> onnx.ModelProto:
    t = ONNX_TYPE[dtype]
    graph = helper.make_graph(
        [grownorm_node(["X", "g"], "Y", groups, None if axis == 1 else axis)], "t",
        [helper.make_tensor_value_info("X", t, shape), helper.make_tensor_value_info("g", t, [shape[axis]])],
        [helper.make_tensor_value_info("Y", t, shape)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)],
                             functions=[function or grownorm_function()])


def run_ort(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def run_reference(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    return ReferenceEvaluator(onnx.inliner.inline_local_functions(model)).run(None, feeds)[0]


def rel_err(got, want) -> float:
    return float(np.abs(got.astype(np.float64) - want).max() / np.abs(want).max())


SHAPES = {(1, 2): (3, 7), (1, 3): (2, 7, 5), (1, 4): (2, 7, 3, 4),
          (-1, 2): (3, 7), (-1, 3): (2, 5, 7), (-1, 4): (2, 3, 4, 7)}
GROUPS = [(7,), (4, 3), (2, 3, 2)]


@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("rank", [2, 3, 4])
@pytest.mark.parametrize("groups", GROUPS, ids=["C", "Co+Cn", "3groups"])
def test_function_matches_float64_in_ort_and_reference_evaluator(axis, rank, groups):
    shape = SHAPES[(axis, rank)]
    model = single_node_model(shape, groups, axis)
    onnx.checker.check_model(model)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    assert [d.dim_value for d in inferred.graph.output[0].type.tensor_type.shape.dim] == list(shape)
    rng = np.random.default_rng(rank * 7 + len(groups))
    x = rng.normal(size=shape).astype(np.float32)
    first = (0, slice(0, groups[0])) if axis == 1 else (0, Ellipsis, slice(0, groups[0]))
    x[first] = 0  # an all-zero group in one sample: y = 0 there, not NaN
    g = (rng.random(7) * 3 + 0.5).astype(np.float32)
    want = reference(x, groups, g, axis=axis)
    feeds = {"X": x, "g": g}
    got_ort, got_ref = run_ort(model, feeds), run_reference(model, feeds)
    assert rel_err(got_ort, want) <= 1e-6 and rel_err(got_ref, want) <= 1e-6
    assert np.isfinite(got_ort).all()


@pytest.mark.parametrize("axis", [1, -1])
def test_fp16_inputs(axis):
    shape = SHAPES[(axis, 3)]
    model = single_node_model(shape, (4, 3), axis, np.float16)
    rng = np.random.default_rng(3)
    x = rng.normal(size=shape).astype(np.float16)
    g = (rng.random(7) * 3 + 0.5).astype(np.float16)
    want = reference(x, (4, 3), g, axis=axis)
    assert rel_err(run_ort(model, {"X": x, "g": g}), want) <= 2e-3
    assert rel_err(run_reference(model, {"X": x, "g": g}), want) <= 2e-3


@pytest.mark.parametrize("axis", [1, -1])
def test_a_tiny_new_group_beside_a_large_old_one_keeps_full_precision(axis):
    """New units start small (paper): a group 1e6x smaller than its neighbour is normalized to the
    same relative precision (no difference of running sums)."""
    shape = (3, 64, 5) if axis == 1 else (3, 5, 64)
    groups = (48, 16)
    rng = np.random.default_rng(5)
    x = rng.normal(size=shape).astype(np.float32)
    new = (slice(None), slice(48, 64)) if axis == 1 else (Ellipsis, slice(48, 64))
    x[new] *= 1e-6
    g = np.ones(64, np.float32)
    model = single_node_model(shape, groups, axis)
    want = reference(x, groups, g, axis=axis)
    got = run_ort(model, {"X": x, "g": g})
    np.testing.assert_allclose(got[new], want[new], rtol=1e-5, atol=0)


def test_two_nodes_of_different_axes_and_splits_share_one_function():
    nodes = [grownorm_node(["X", "g1"], "H", (3, 5), None, name="gn_first"),          # over dim 1: C = 8
             helper.make_node("Transpose", ["H"], ["Ht"], perm=[0, 2, 1], name="t"),
             grownorm_node(["Ht", "g2"], "Y", (1, 4, 3), -1, name="gn_last")]          # over the last dim
    graph = helper.make_graph(nodes, "two",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, 8, 8]),
                               helper.make_tensor_value_info("g1", TensorProto.FLOAT, [8]),
                               helper.make_tensor_value_info("g2", TensorProto.FLOAT, [8])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, 8, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)],
                              functions=[grownorm_function()])
    onnx.checker.check_model(model)
    assert len(model.functions) == 1
    inner = [n.name for n in model.functions[0].node]
    assert len(set(inner)) == len(inner) and all(n.startswith("surgeon_GrowNorm_") for n in inner)
    rng = np.random.default_rng(8)
    x = rng.normal(size=(2, 8, 8)).astype(np.float32)
    g1, g2 = (rng.random(8) + 0.5).astype(np.float32), (rng.random(8) + 0.5).astype(np.float32)
    h = reference(x, (3, 5), g1, axis=1)
    want = reference(np.transpose(h, (0, 2, 1)), (1, 4, 3), g2, axis=-1)
    feeds = {"X": x, "g1": g1, "g2": g2}
    assert rel_err(run_ort(model, feeds), want) <= 1e-6
    assert rel_err(run_reference(model, feeds), want) <= 1e-6


def _function_before_axis() -> onnx.FunctionProto:
    """The local function as files written before ``axis`` carry it (Einsum over dim 1), verbatim in
    its computation: a frozen copy for the compatibility test."""
    def node(op, inputs, outputs, **attrs):
        return helper.make_node(op, inputs, outputs, name=f"surgeon_GrowNorm_{outputs[0]}", **attrs)

    def ref(name, attr, typ):
        a = onnx.AttributeProto()
        a.name, a.ref_attr_name, a.type = name, attr, typ
        return a

    sizes = node("Constant", [], ["sizes"])
    sizes.attribute.append(ref("value_ints", "groups", onnx.AttributeProto.INTS))
    eps = node("Constant", [], ["eps_f"])
    eps.attribute.append(ref("value_float", "eps", onnx.AttributeProto.FLOAT))
    nodes = [
        sizes,
        node("Constant", [], ["zero"], value=helper.make_tensor("zero", TensorProto.INT64, [], [0])),
        node("Constant", [], ["one"], value=helper.make_tensor("one", TensorProto.INT64, [], [1])),
        node("Constant", [], ["axis1"], value=helper.make_tensor("axis1", TensorProto.INT64, [1], [1])),
        node("CumSum", ["sizes", "zero"], ["ends"]),
        node("Sub", ["ends", "sizes"], ["starts"]),
        node("ReduceSum", ["sizes"], ["total"], keepdims=0),
        node("Range", ["zero", "total", "one"], ["channel"]),
        node("Unsqueeze", ["channel", "axis1"], ["channel_col"]),
        node("GreaterOrEqual", ["channel_col", "starts"], ["after_start"]),
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
    return helper.make_function(DOMAIN, "GrowNorm", ["X", "gamma"], ["Y"], nodes,
                                opset_imports=[helper.make_opsetid("", 18)],
                                attributes=["groups", "eps", "plugin_namespace", "plugin_version"])


@pytest.mark.parametrize("shape, groups", [((3, 7), (4, 3)), ((2, 7, 3, 4), (2, 3, 2)), ((2, 7, 5), (7,))])
def test_files_written_before_axis_give_the_same_numbers(shape, groups):
    """A file of the current layout without ``axis`` (its own, older function) and the same node
    under the new function agree, and both match float64."""
    rng = np.random.default_rng(len(shape))
    x = rng.normal(size=shape).astype(np.float32)
    g = (rng.random(7) + 0.5).astype(np.float32)
    old = single_node_model(shape, groups, 1, function=_function_before_axis())
    new = single_node_model(shape, groups, 1)
    assert old.graph.SerializeToString() == new.graph.SerializeToString()  # the node is byte-identical
    want = reference(x, groups, g)
    got_old, got_new = run_ort(old, {"X": x, "g": g}), run_ort(new, {"X": x, "g": g})
    assert rel_err(got_old, want) <= 1e-6 and rel_err(got_new, want) <= 1e-6
    assert np.abs(got_old - got_new).max() <= 1e-6 * np.abs(want).max()


def test_function_declares_axis_with_default_one_and_the_export_schema_knows_it():
    fn = grownorm_function()
    assert [(a.name, a.i) for a in fn.attribute_proto] == [("axis", 1)] and "axis" not in fn.attribute
    with grownorm_op.registered_schema():
        schema = onnx.defs.get_schema("GrowNorm", 1, DOMAIN)
        # optional, without a schema default (the exporter would write it into every axis-1 node)
        assert not schema.attributes["axis"].required and not schema.attributes["axis"].default_value.name
    with pytest.raises(onnx.defs.SchemaError):
        onnx.defs.get_schema("GrowNorm", 1, DOMAIN)  # removed again after export


# -- torch export of a token model, and the passes on it ------------------------------------------


class Tokens(nn.Module):
    """Patch embedding → Linear → GELU → GrowNorm(axis=-1) → Linear → mean over tokens → head: a
    ViT-style MLP on [N, T, C] tokens, exported through surgeon's exporter (images in)."""

    def __init__(self, after: str = "linear") -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.fc1 = nn.Linear(8, 24)
        self.act = nn.GELU()
        self.norm = GrowNorm((16, 8), axis=-1)
        self.after = after
        self.fc2 = nn.Linear(24, 8) if after == "linear" else nn.Identity()
        self.head = nn.Linear(8 if after == "linear" else (24 if after == "mean" else 24 * 16), 4)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)            # [N, T, C]
        h = self.norm(self.act(self.fc1(t)))
        if self.after == "linear":
            return self.head(torch.relu(self.fc2(h)).mean(1))
        if self.after == "mean":                                  # mean over T, then the head (Gemm)
            return self.head(h.mean(1))
        return self.head(h.flatten(1))                            # [N, T*C]: channel-minor columns


def _token_model(after: str = "linear"):
    torch.manual_seed(0)
    model = Tokens(after).eval()
    with torch.no_grad():
        model.norm.gamma.uniform_(0.5, 3.0)
    lean = to_onnx(model, 16, batch=BatchRange(1, 4, 8))
    return model, lean


def _ort_vs_torch(model, proto, batch=5) -> float:
    x = torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        want = model(x).double().numpy()
    return rel_err(run_ort(proto, {"images": x.numpy()}), want)


def test_token_model_exports_with_axis_and_matches_pytorch():
    model, lean = _token_model()
    proto = lean.to_proto()
    onnx.checker.check_model(proto)
    nodes = [n for n in proto.graph.node if n.domain == DOMAIN]
    attrs = {a.name: helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert len(nodes) == 1 and attrs["axis"] == -1 and list(attrs["groups"]) == [16, 8]
    assert len(proto.functions) == 1
    assert _ort_vs_torch(model, proto) <= 1e-5 and _ort_vs_torch(model, proto, batch=1) <= 1e-5


def test_axis_one_export_writes_no_axis_attribute():
    class Conv(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3)
            self.norm = GrowNorm((4, 2))

        def forward(self, x):
            return self.norm(torch.relu(self.conv(x))).mean((2, 3))

    proto = to_onnx(Conv().eval(), 8).to_proto()
    node = next(n for n in proto.graph.node if n.domain == DOMAIN)
    assert sorted(a.name for a in node.attribute) == ["eps", "groups", "plugin_namespace", "plugin_version"]


def _passes(lean):
    checked = []
    return default_passes(True).run(lean, after_each=lambda name, m: checked.append(name)), checked


def test_fold_gamma_folds_axis_minus_one_into_matmul_rows_and_the_mean_head():
    for after, consumer in (("linear", "MatMul"), ("mean", "Gemm")):
        model, lean = _token_model(after)
        (folded, results), _ = _passes(lean)
        fold = [r for r in results if r.name == "fold-gamma" and r.changed]
        assert fold and consumer in fold[0].changed[0][1], (after, [r.changed + r.skipped for r in results])
        proto = folded.to_proto()
        gamma = next(t for t in proto.graph.initializer if "gamma_residual" in t.name)
        assert np.all(onnx.numpy_helper.to_array(gamma) == 1)  # every γ moved into the weight
        assert _ort_vs_torch(model, proto) <= 1e-5, after


def test_fold_gamma_refuses_a_channel_minor_flatten_on_axis_minus_one():
    """[N, T, C] → [N, T*C] puts each channel at every C-th column: the axis-1 rule (repeat γ per
    position) would scale the wrong columns, so the pass skips it and says why."""
    model, lean = _token_model("flatten")
    result = fold_gamma(import_graph(lean))
    assert not result.changed
    assert any(why.startswith("axis -1:") and ("Reshape" in why or "Flatten" in why) for _, why in result.skipped), result.skipped
    (after, _), _ = _passes(lean)
    assert _ort_vs_torch(model, after.to_proto()) <= 1e-5


def test_merge_parallel_on_token_branches():
    """Two bias-free Linear branches on [N, T, C] concatenated on the last axis merge into one MatMul
    (then γ folds into its consumer); concatenated on the token axis they must not."""

    class Widened(nn.Module):
        def __init__(self, dim: int) -> None:
            super().__init__()
            self.embed = nn.Conv2d(3, 8, 4, stride=4)
            self.dim = dim
            k = 8 if dim == -1 else 16  # concatenated on tokens, the branches need equal widths
            self.old, self.new = nn.Linear(8, 16, bias=False), nn.Linear(8, k, bias=False)
            self.norm = GrowNorm((16, 8) if dim == -1 else (16,), axis=-1)
            self.out = nn.Linear(24 if dim == -1 else 16, 4)

        def forward(self, x):
            t = self.embed(x).flatten(2).transpose(1, 2)
            h = torch.cat([self.old(t), self.new(t)], dim=self.dim)
            return self.out(torch.relu(self.norm(h))).mean(1)

    for dim in (-1, 1):
        torch.manual_seed(1)
        model = Widened(dim).eval()
        with torch.no_grad():
            model.norm.gamma.uniform_(0.5, 3.0)
        lean = to_onnx(model, 16, batch=BatchRange(1, 4, 8))
        result = merge_parallel(import_graph(lean))
        if dim == -1:
            assert len(result.changed) == 1 and "merged branches" in result.changed[0][1]
        else:
            assert not result.changed
        out, _ = PassManager([("merge-parallel", merge_parallel), ("fold-gamma", fold_gamma)]).run(lean)
        assert _ort_vs_torch(model, out.to_proto()) <= 1e-5, dim


@pytest.mark.parametrize("shape, groups, axis", [((3, 160), (128, 32), 1), ((2, 5, 96), (64, 16, 16), -1),
                                                  ((2, 5, 200), (192, 8), -1), ((2, 48, 1, 1), (40, 8), 1),
                                                  ((2, 6, 66), (64, 2), -1)])
def test_channel_blocks_where_each_row_holds_one_position(shape, groups, axis):
    """Where S = 1 the body works on blocks of f channels (a power of two dividing every group,
    here 32, 16, 8, 8 and 2): numbers as the float64 reference, in ONNX Runtime and onnx's evaluator."""
    C = sum(groups)
    rng = np.random.default_rng(C)
    x = rng.normal(size=shape).astype(np.float32)
    second = slice(groups[0], groups[0] + groups[1])
    x[(0, second) if axis == 1 else (0, Ellipsis, second)] = 0  # an all-zero group in one sample
    g = (rng.random(C) * 3 + 0.5).astype(np.float32)
    model = single_node_model(shape, groups, axis)
    onnx.checker.check_model(model)
    want = reference(x, groups, g, axis=axis)
    feeds = {"X": x, "g": g}
    got_ort, got_ref = run_ort(model, feeds), run_reference(model, feeds)
    assert rel_err(got_ort, want) <= 1e-6 and rel_err(got_ref, want) <= 1e-6
    assert np.isfinite(got_ort).all()
