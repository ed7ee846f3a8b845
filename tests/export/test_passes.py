"""Graph passes (DESIGN.md §2) on small hand-built ONNX graphs: fold-gamma, merge-parallel, cleanup,
the pass manager and summarize(). Every pass that changes a graph is checked on numbers with ONNX
Runtime (CPU), not only on structure; every refusal leaves the graph unchanged and says why."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from surgeon.export import lean
from surgeon.export.grownorm_op import grownorm_function
from surgeon.export.passes.base import PassManager, PassResult, default_passes, export_graph, import_graph, summarize
from surgeon.export.passes.cleanup import cleanup
from surgeon.export.passes.fold_gamma import fold_gamma
from surgeon.export.passes.merge_parallel import merge_parallel

RNG_SEED = 0


@pytest.fixture(autouse=True, params=[lean.SMALL_TENSOR, 16], ids=["weights-in-proto", "weights-beside-graph"])
def weight_threshold(request, monkeypatch):
    """Every pass test runs twice: with the hand-built weights inside the proto (they are small) and
    with all but the tiniest kept beside the graph, as for real models."""
    monkeypatch.setattr(lean, "SMALL_TENSOR", request.param)


# --------------------------------------------------------------------------------------------------
# Hand-built graphs


class G:
    """A tiny ONNX graph builder: opset 18 + ``surgeon`` v1, GrowNorm's local function attached."""

    def __init__(self, seed: int = RNG_SEED):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._n = itertools.count()

    def input(self, name: str, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
        return name

    def const(self, name: str, value) -> str:
        arr = np.asarray(value)
        if arr.dtype == np.float64:
            arr = arr.astype(np.float32)
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def rand(self, name: str, shape, lo: float = -1.0, hi: float = 1.0) -> str:
        return self.const(name, self.rng.uniform(lo, hi, size=shape).astype(np.float32))

    def node(self, op: str, inputs: list[str], name: str | None = None, n_out: int = 1, domain: str = "", **attrs) -> str:
        name = name or f"{op.lower()}{next(self._n)}"
        outs = [f"{name}_out{i}" if i else f"{name}_out" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, domain=domain, **attrs))
        return outs[0]

    def grownorm(self, x: str, gamma: str, groups: list[int], name: str = "gn") -> str:
        return self.node("GrowNorm", [x, gamma], name=name, domain="surgeon", groups=groups, eps=1e-6,
                         plugin_namespace="surgeon", plugin_version="1")

    def gamma(self, c: int, name: str = "gamma", lo: float = 0.5, hi: float = 3.0) -> str:
        return self.rand(name, [c], lo, hi)

    def output(self, *names: str) -> None:
        for name in names:
            self.outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))

    def model(self) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "g", self.inputs, self.outputs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("surgeon", 1)],
                                  functions=[grownorm_function()], producer_name="test_passes")
        model.ir_version = 10
        return model


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def random_feeds(model: onnx.ModelProto, batch: int = 3, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in model.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else batch for d in vi.type.tensor_type.shape.dim]
        feeds[vi.name] = rng.normal(size=dims).astype(np.float32)
    return feeds


def assert_same_numbers(before: onnx.ModelProto, after: onnx.ModelProto, feeds: dict | None = None) -> None:
    feeds = feeds or random_feeds(before)
    ref, got = run(before, feeds), run(after, feeds)
    assert [o.name for o in before.graph.output] == [o.name for o in after.graph.output]
    for r, g in zip(ref, got):
        assert r.shape == g.shape
        scale = max(1.0, float(np.abs(r).max()))
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5 * scale)


def run_pass(model: onnx.ModelProto, name: str, fn) -> tuple[onnx.ModelProto, PassResult]:
    out, results = PassManager([(name, fn)], max_rounds=1).run(model)
    return out, results[0]


def init(model: onnx.ModelProto, name: str) -> np.ndarray:
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    raise KeyError(name)


def node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    matches = [n for n in model.graph.node if n.name == name]
    assert len(matches) == 1, f"{name}: {[n.name for n in model.graph.node]}"
    return matches[0]


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def gamma_of(model: onnx.ModelProto, name: str = "gn") -> np.ndarray:
    return init(model, node(model, name).input[1])


def weight_of(model: onnx.ModelProto, name: str) -> np.ndarray:
    return init(model, node(model, name).input[1])


def fingerprint(model: onnx.ModelProto) -> tuple:
    """Nodes (op, name, inputs, outputs, attributes) and initializer values: enough to call two graphs equal."""
    nodes = tuple((n.op_type, n.domain, n.name, tuple(n.input), tuple(n.output),
                   tuple(a.SerializeToString() for a in n.attribute)) for n in model.graph.node)
    inits = tuple(sorted((t.name, numpy_helper.to_array(t).tobytes()) for t in model.graph.initializer))
    return nodes, inits, tuple(o.name for o in model.graph.output), tuple(i.name for i in model.graph.input)


# --------------------------------------------------------------------------------------------------
# fold-gamma: what folds

C, H, W, M = 4, 3, 3, 5
GROUPS = [3, 1]


def _vec(g: G, c: int = C) -> str:
    return g.grownorm(g.input("x", ["N", c]), g.gamma(c), GROUPS)


def _img(g: G, c: int = C, h: int = H, w: int = W) -> str:
    return g.grownorm(g.input("x", ["N", c, h, w]), g.gamma(c), GROUPS)


def _gemm(g: G, x: str, k: int, trans_b: int = 1, name: str = "fc") -> str:
    wshape = [M, k] if trans_b else [k, M]
    return g.node("Gemm", [x, g.rand(f"{name}_w", wshape), g.rand(f"{name}_b", [M])], name=name, transB=trans_b)


def _conv(g: G, x: str, c: int = C, name: str = "conv", **attrs) -> str:
    return g.node("Conv", [x, g.rand(f"{name}_w", [M, c, 3, 3]), g.rand(f"{name}_b", [M])], name=name,
                  pads=[1, 1, 1, 1], **attrs)


def case_gemm_transb1(g):
    return _gemm(g, _vec(g), C, 1), "fc"


def case_gemm_transb0(g):
    return _gemm(g, _vec(g), C, 0), "fc"


def case_matmul(g):
    return g.node("MatMul", [_vec(g), g.rand("mm_w", [C, M])], name="mm"), "mm"


def case_conv(g):
    return _conv(g, _img(g)), "conv"


def case_dropout_identity(g):
    y = g.node("Dropout", [_vec(g)], name="drop")
    y = g.node("Identity", [y], name="ident")
    return _gemm(g, y, C), "fc"


def case_averagepool(g):
    y = g.node("AveragePool", [_img(g)], name="avg", kernel_shape=[2, 2], strides=[1, 1], pads=[1, 1, 0, 0],
               count_include_pad=1)
    return _conv(g, y), "conv"


def case_global_averagepool_flatten(g):
    y = g.node("GlobalAveragePool", [_img(g)], name="gap")
    y = g.node("Flatten", [y], name="flat", axis=1)
    return _gemm(g, y, C), "fc"


def case_reducemean_keepdims0(g):
    y = g.node("ReduceMean", [_img(g), g.const("axes", np.array([2, 3], np.int64))], name="mean", keepdims=0)
    return _gemm(g, y, C), "fc"


def case_reducemean_keepdims1_reshape(g):
    y = g.node("ReduceMean", [_img(g), g.const("axes", np.array([2, 3], np.int64))], name="mean", keepdims=1)
    y = g.node("Reshape", [y, g.const("shape", np.array([0, -1], np.int64))], name="reshape")
    return g.node("MatMul", [y, g.rand("mm_w", [C, M])], name="mm"), "mm"


def case_relu_maxpool(g):
    y = g.node("Relu", [_img(g)], name="relu")
    y = g.node("MaxPool", [y], name="maxpool", kernel_shape=[2, 2], strides=[1, 1], pads=[0, 0, 1, 1])
    return _conv(g, y), "conv"


def case_leakyrelu_globalmaxpool(g):
    y = g.node("LeakyRelu", [_img(g)], name="lrelu", alpha=0.1)
    y = g.node("GlobalMaxPool", [y], name="gmp")
    y = g.node("Flatten", [y], name="flat")
    return _gemm(g, y, C), "fc"


def case_flatten(g):
    y = g.node("Flatten", [_img(g)], name="flat", axis=1)
    return _gemm(g, y, C * H * W), "fc"


def case_reshape_minus1(g):
    y = g.node("Reshape", [_img(g), g.const("shape", np.array([-1, C * H * W], np.int64))], name="reshape")
    return _gemm(g, y, C * H * W, trans_b=0), "fc"


def case_reshape_0_minus1(g):
    y = g.node("Reshape", [_img(g), g.const("shape", np.array([0, -1], np.int64))], name="reshape")
    return g.node("MatMul", [y, g.rand("mm_w", [C * H * W, M])], name="mm"), "mm"


def case_relu_maxpool_flatten_dropout(g):
    y = g.node("Relu", [_img(g)], name="relu")
    y = g.node("MaxPool", [y], name="maxpool", kernel_shape=[2, 2], strides=[1, 1])  # 3x3 -> 2x2
    y = g.node("Flatten", [y], name="flat")
    y = g.node("Dropout", [y], name="drop")
    return _gemm(g, y, C * 2 * 2), "fc"


FOLD_CASES = {name[5:]: fn for name, fn in globals().items() if name.startswith("case_")}


@pytest.mark.parametrize("case", sorted(FOLD_CASES))
def test_fold_gamma_moves_gamma_into_the_consumer(case):
    g = G()
    y, consumer = FOLD_CASES[case](g)
    g.output(y)
    model = g.model()
    gamma = gamma_of(model)
    assert np.all(gamma > 0) and not np.allclose(gamma, 1)

    out, result = run_pass(model, "fold-gamma", fold_gamma)

    assert [c for c, _ in result.changed] == ["gn"], result
    assert consumer in result.changed[0][1]
    assert result.skipped == []
    np.testing.assert_array_equal(gamma_of(out), np.ones(C, np.float32))
    assert not np.allclose(weight_of(out, consumer), weight_of(model, consumer))
    # Only the weight moved: the op sequence is the same.
    assert ops(out) == ops(model)
    assert_same_numbers(model, out)


def test_fold_gamma_scales_the_right_weight_axis():
    """Gemm transB=1 scales columns, transB=0 rows; flattening repeats each γ_c over its H·W positions."""
    g = G()
    y = g.node("Flatten", [_img(g)], name="flat")
    g.output(_gemm(g, y, C * H * W, trans_b=0))
    model = g.model()
    out, _ = run_pass(model, "fold-gamma", fold_gamma)
    expected = weight_of(model, "fc") * np.repeat(gamma_of(model), H * W)[:, None]
    np.testing.assert_allclose(weight_of(out, "fc"), expected, rtol=1e-6)

    g = G()
    g.output(_gemm(g, _vec(g), C, trans_b=1))
    model = g.model()
    out, _ = run_pass(model, "fold-gamma", fold_gamma)
    np.testing.assert_allclose(weight_of(out, "fc"), weight_of(model, "fc") * gamma_of(model)[None, :], rtol=1e-6)


def test_fold_gamma_partial_before_relu_keeps_negative_channels():
    g = G()
    gamma = np.array([2.0, -1.5, 0.5, -0.25], np.float32)
    x = g.grownorm(g.input("x", ["N", C, H, W]), g.const("gamma", gamma), GROUPS)
    g.output(_conv(g, g.node("Relu", [x], name="relu")))
    model = g.model()

    out, result = run_pass(model, "fold-gamma", fold_gamma)

    assert [c for c, _ in result.changed] == ["gn"]
    assert "2/4" in result.changed[0][1]
    np.testing.assert_array_equal(gamma_of(out), [1.0, -1.5, 1.0, -0.25])
    w0, w1 = weight_of(model, "conv"), weight_of(out, "conv")
    np.testing.assert_allclose(w1[:, [0, 2]], w0[:, [0, 2]] * gamma[[0, 2]][None, :, None, None], rtol=1e-6)
    np.testing.assert_array_equal(w1[:, [1, 3]], w0[:, [1, 3]])
    [(cand, why)] = result.skipped
    assert cand == "gn" and "γ ≤ 0" in why and "Relu" in why
    assert_same_numbers(model, out)


def test_fold_gamma_all_negative_before_relu_is_refused():
    g = G()
    x = g.grownorm(g.input("x", ["N", C, H, W]), g.gamma(C, lo=-2.0, hi=-0.5), GROUPS)
    g.output(_conv(g, g.node("Relu", [x], name="relu")))
    model = g.model()
    out, result = run_pass(model, "fold-gamma", fold_gamma)
    assert not result.did_change and fingerprint(out) == fingerprint(model)
    [(cand, why)] = result.skipped
    assert cand == "gn" and "γ > 0" in why


def test_fold_gamma_negative_gamma_folds_fully_without_relu():
    g = G()
    x = g.grownorm(g.input("x", ["N", C]), g.const("gamma", np.array([2.0, -1.5, 0.5, -0.25], np.float32)), GROUPS)
    g.output(_gemm(g, g.node("Dropout", [x], name="drop"), C))
    model = g.model()
    out, result = run_pass(model, "fold-gamma", fold_gamma)
    assert result.did_change and result.skipped == []
    np.testing.assert_array_equal(gamma_of(out), np.ones(C, np.float32))
    assert_same_numbers(model, out)


# --------------------------------------------------------------------------------------------------
# fold-gamma: refusals


def refuse_two_consumers(g):
    x = _vec(g)
    g.output(_gemm(g, x, C, name="fc1"), _gemm(g, x, C, name="fc2"))
    return "2 consumers"


def refuse_residual_add(g):
    x = _vec(g)
    y = g.node("Add", [x, g.input("skip", ["N", C])], name="add")
    g.output(_gemm(g, y, C))
    return "residual"


def refuse_graph_output(g):
    g.output(_vec(g))
    return "graph output"


def refuse_weight_is_graph_input(g):
    x = _vec(g)
    g.output(g.node("Gemm", [x, g.input("w", [M, C])], name="fc", transB=1))
    return "not a constant"


def refuse_grouped_conv(g):
    x = _img(g)
    g.output(g.node("Conv", [x, g.rand("conv_w", [M * 2, C // 2, 3, 3])], name="conv", group=2, pads=[1, 1, 1, 1]))
    return "grouped"


def refuse_gemm_trans_a(g):
    x = g.grownorm(g.input("x", [6, C]), g.gamma(C), GROUPS)   # A = x, read transposed: [C, 6]
    g.output(g.node("Gemm", [x, g.rand("fc_w", [6, M])], name="fc", transA=1))
    return "transposes its input"


def refuse_reshape_not_channel_major(g):
    y = g.node("Reshape", [_img(g), g.const("shape", np.array([-1, H * W], np.int64))], name="reshape")  # [N*C, H*W]
    g.output(g.node("MatMul", [y, g.rand("mm_w", [H * W, M])], name="mm"))
    return "channel-major"


def refuse_gamma_not_constant(g):
    x = g.grownorm(g.input("x", ["N", C]), g.input("g", [C]), GROUPS)
    g.output(_gemm(g, x, C))
    return "γ is not a constant"


def refuse_sigmoid(g):
    g.output(_gemm(g, g.node("Sigmoid", [_vec(g)], name="sig"), C))
    return "does not commute"


def refuse_reducemean_over_channels(g):
    y = g.node("ReduceMean", [_img(g), g.const("axes", np.array([1, 2], np.int64))], name="mean", keepdims=0)
    g.output(g.node("MatMul", [y, g.rand("mm_w", [W, M])], name="mm"))
    return "ReduceMean"


def refuse_grownorm_feeds_the_weight_slot(g):
    x = _vec(g)
    g.output(g.node("MatMul", [g.input("a", [2, "N"]), x], name="mm"))
    return "as a weight"


REFUSALS = {name[7:]: fn for name, fn in globals().items() if name.startswith("refuse_")}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_fold_gamma_refusals_leave_the_graph_unchanged(case):
    g = G()
    reason = REFUSALS[case](g)
    model = g.model()
    out, result = run_pass(model, "fold-gamma", fold_gamma)
    assert not result.did_change
    assert fingerprint(out) == fingerprint(model)
    [(cand, why)] = result.skipped
    assert cand == "gn" and reason in why, why
    # The pass alone (without the manager) leaves it unchanged too.
    graph = import_graph(model)
    assert not fold_gamma(graph).did_change
    assert fingerprint(export_graph(graph, model)) == fingerprint(export_graph(import_graph(model), model))


def test_fold_gamma_refuses_when_the_output_is_also_a_graph_output():
    g = G()
    x = _vec(g)
    g.output(x, _gemm(g, x, C))
    model = g.model()
    out, result = run_pass(model, "fold-gamma", fold_gamma)
    assert_same_numbers(model, out)
    assert not result.did_change and "graph output" in result.skipped[0][1]


def test_fold_gamma_refuses_when_a_path_tensor_is_a_graph_output():
    g = G()
    r = g.node("Relu", [_img(g)], name="relu")
    g.output(r, _conv(g, r))
    model = g.model()
    out, result = run_pass(model, "fold-gamma", fold_gamma)
    assert_same_numbers(model, out)
    assert not result.did_change


def test_fold_gamma_refuses_matmul_that_does_not_contract_channels():
    g = G()
    x = g.grownorm(g.input("x", ["N", C, C]), g.gamma(C), GROUPS)   # [N, C, L=C]
    g.output(g.node("MatMul", [x, g.rand("mm_w", [C, M])], name="mm"))
    model = g.model()
    out, result = run_pass(model, "fold-gamma", fold_gamma)
    assert_same_numbers(model, out)
    assert not result.did_change


def test_fold_gamma_two_norms_with_tied_weights():
    """Two GrowNorms whose consumers share one weight initializer: each gets its own folded weight."""
    g = G()
    w, b = g.rand("w", [M, C]), g.rand("b", [M])
    x1 = g.grownorm(g.input("x1", ["N", C]), g.gamma(C, "g1"), GROUPS, name="gn1")
    x2 = g.grownorm(g.input("x2", ["N", C]), g.gamma(C, "g2"), GROUPS, name="gn2")
    g.output(g.node("Gemm", [x1, w, b], name="fc1", transB=1), g.node("Gemm", [x2, w, b], name="fc2", transB=1))
    model = g.model()
    out, result = run_pass(model, "fold-gamma", fold_gamma)
    assert sorted(c for c, _ in result.changed) == ["gn1", "gn2"]
    names = [t.name for t in out.graph.initializer]
    assert len(names) == len(set(names)), f"duplicate initializer names: {names}"
    onnx.checker.check_model(out)
    assert_same_numbers(model, out)


# --------------------------------------------------------------------------------------------------
# Idempotence


MIXED_GAMMA2 = np.array([2.0, -1.5, 0.5, 3.0, 0.0], np.float32)


def _mixed_model() -> onnx.ModelProto:
    """A partial fold through Relu/MaxPool/Flatten, a full fold into a Conv, Identity/Dropout to clean."""
    g = G()
    x = g.node("Identity", [_img(g)], name="ident")
    y = _conv(g, x, name="conv1")
    y = g.grownorm(y, g.const("gamma2", MIXED_GAMMA2), [M - 2, 2], name="gn2")
    y = g.node("Relu", [y], name="relu")
    y = g.node("MaxPool", [y], name="maxpool", kernel_shape=[2, 2], strides=[1, 1])
    y = g.node("Flatten", [y], name="flat")
    y = g.node("Dropout", [y], name="drop")
    g.output(_gemm(g, y, M * 2 * 2, name="fc"))
    return g.model()


@pytest.mark.parametrize("manager", ["fold-gamma", "default"])
def test_passes_are_idempotent(manager):
    model = _mixed_model()
    pm = default_passes() if manager == "default" else PassManager([("fold-gamma", fold_gamma)])
    once, results1 = pm.run(model)
    twice, results2 = pm.run(once)
    assert any(r.did_change for r in results1)
    assert not any(r.did_change for r in results2), [r for r in results2 if r.did_change]
    assert len(results2) == len(pm.passes)  # one round: nothing changed
    assert fingerprint(twice) == fingerprint(once)
    assert_same_numbers(model, once)
    np.testing.assert_array_equal(gamma_of(once, "gn"), np.ones(C, np.float32))
    np.testing.assert_array_equal(gamma_of(once, "gn2"), np.where(MIXED_GAMMA2 > 0, 1, MIXED_GAMMA2))
    if manager == "default":
        assert "Identity" not in ops(once) and "Dropout" not in ops(once)


# --------------------------------------------------------------------------------------------------
# merge-parallel


def _two_convs(g: G, bias: tuple[bool, bool], attrs=({}, {}), inputs=None, axis: int = 1, out_channels=(3, 2)):
    x = g.input("x", ["N", C, 5, 5])
    srcs = inputs or (x, x)
    outs = []
    for i, (b, a, src, m) in enumerate(zip(bias, attrs, srcs, out_channels)):
        ins = [src, g.rand(f"conv{i}_w", [m, C, 3, 3])] + ([g.rand(f"conv{i}_b", [m])] if b else [])
        outs.append(g.node("Conv", ins, name=f"conv{i}", **{"pads": [1, 1, 1, 1], **a}))
    return outs, g.node("Concat", outs, name="cat", axis=axis)


@pytest.mark.parametrize("bias", [(True, True), (False, False), (True, False), (False, True)])
def test_merge_two_convs(bias):
    g = G()
    _, y = _two_convs(g, bias, attrs=({"strides": [2, 2]}, {"strides": [2, 2]}))
    g.output(g.node("Relu", [y], name="relu"))
    model = g.model()
    out, result = run_pass(model, "merge-parallel", merge_parallel)
    assert [c for c, _ in result.changed] == ["cat"] and result.skipped == []
    assert ops(out) == ["Conv", "Relu"]
    conv = out.graph.node[0]
    assert len(conv.input) == (3 if any(bias) else 2)
    assert {a.name: helper.get_attribute_value(a) for a in conv.attribute} == {"pads": [1, 1, 1, 1], "strides": [2, 2]}
    assert init(out, conv.input[1]).shape == (5, C, 3, 3)
    assert_same_numbers(model, out)


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bias", [(True, True), (True, False)])
def test_merge_two_gemms(trans_b, bias):
    g = G()
    x = g.input("x", ["N", C])
    outs = []
    for i, (m, b) in enumerate(zip((3, 2), bias)):
        w = g.rand(f"fc{i}_w", [m, C] if trans_b else [C, m])
        outs.append(g.node("Gemm", [x, w] + ([g.rand(f"fc{i}_b", [m])] if b else []), name=f"fc{i}", transB=trans_b,
                           alpha=0.5))
    g.output(g.node("Concat", outs, name="cat", axis=1))
    model = g.model()
    out, result = run_pass(model, "merge-parallel", merge_parallel)
    assert result.did_change and ops(out) == ["Gemm"]
    assert_same_numbers(model, out)


@pytest.mark.parametrize("axis", [-1, 1])
def test_merge_two_matmuls(axis):
    g = G()
    x = g.input("x", ["N", C])
    outs = [g.node("MatMul", [x, g.rand(f"mm{i}_w", [C, m])], name=f"mm{i}") for i, m in enumerate((3, 2))]
    g.output(g.node("Concat", outs, name="cat", axis=axis))
    model = g.model()
    out, result = run_pass(model, "merge-parallel", merge_parallel)
    assert result.did_change and ops(out) == ["MatMul"]
    assert_same_numbers(model, out)


def _merge_refusal_different_attrs(g):
    x = g.input("x", ["N", C, 5, 5])
    a = g.node("Conv", [x, g.rand("w0", [3, C, 3, 3])], name="conv0", strides=[1, 1])       # 5 -> 3
    b = g.node("Conv", [x, g.rand("w1", [2, C, 1, 1])], name="conv1", strides=[2, 2])       # 5 -> 3
    g.output(g.node("Concat", [a, b], name="cat", axis=1))
    return "differ"


def _merge_refusal_gemm_alpha(g):
    x = g.input("x", ["N", C])
    a = g.node("Gemm", [x, g.rand("w0", [3, C])], name="fc0", transB=1)
    b = g.node("Gemm", [x, g.rand("w1", [2, C])], name="fc1", transB=1, alpha=2.0)
    g.output(g.node("Concat", [a, b], name="cat", axis=1))
    return "differ"


def _merge_refusal_different_inputs(g):
    x1 = g.input("x1", ["N", C, 5, 5])
    _two_convs(g, (True, True), inputs=(x1, g.input("x2", ["N", C, 5, 5])))
    g.output("cat_out")
    return "differ"


def _merge_refusal_second_consumer(g):
    (a, _), y = _two_convs(g, (True, True))
    g.output(y, g.node("Relu", [a], name="relu"))
    return "other consumers"


def _merge_refusal_concat_axis0(g):
    _two_convs(g, (True, True), axis=0, out_channels=(3, 3))
    g.output("cat_out")
    return "not concatenated on channels"


def _merge_refusal_gemm_axis0(g):
    x = g.input("x", ["N", C])
    outs = [g.node("Gemm", [x, g.rand(f"w{i}", [3, C])], name=f"fc{i}", transB=1) for i in range(2)]
    g.output(g.node("Concat", outs, name="cat", axis=0))
    return "not concatenated on features"


def _merge_refusal_weight_not_constant(g):
    x = g.input("x", ["N", C])
    a = g.node("MatMul", [x, g.rand("w0", [C, 3])], name="mm0")
    b = g.node("MatMul", [x, g.input("w1", [C, 2])], name="mm1")
    g.output(g.node("Concat", [a, b], name="cat", axis=1))
    return "not a constant"


MERGE_REFUSALS = {name[15:]: fn for name, fn in globals().items() if name.startswith("_merge_refusal_")}


@pytest.mark.parametrize("case", sorted(MERGE_REFUSALS))
def test_merge_refusals_leave_the_graph_unchanged(case):
    g = G()
    reason = MERGE_REFUSALS[case](g)
    model = g.model()
    out, result = run_pass(model, "merge-parallel", merge_parallel)
    assert not result.did_change and fingerprint(out) == fingerprint(model)
    [(cand, why)] = result.skipped
    assert cand.startswith("cat") and reason in why, why


def test_merge_refuses_grouped_convs():
    g = G()
    x = g.input("x", ["N", C, 5, 5])
    outs = [g.node("Conv", [x, g.rand(f"w{i}", [C, 1, 3, 3])], name=f"dw{i}", group=C, pads=[1, 1, 1, 1]) for i in range(2)]
    g.output(g.node("Concat", outs, name="cat", axis=1))
    model = g.model()
    out, result = run_pass(model, "merge-parallel", merge_parallel)
    assert_same_numbers(model, out)


def test_merge_refuses_convs_with_different_kernels():
    g = G()
    x = g.input("x", ["N", C, 5, 5])
    a = g.node("Conv", [x, g.rand("w0", [3, C, 3, 3])], name="conv0", auto_pad="SAME_UPPER")
    b = g.node("Conv", [x, g.rand("w1", [2, C, 1, 1])], name="conv1", auto_pad="SAME_UPPER")
    g.output(g.node("Concat", [a, b], name="cat", axis=1))
    model = g.model()
    out, result = run_pass(model, "merge-parallel", merge_parallel)
    assert not result.did_change and fingerprint(out) == fingerprint(model)


def test_merge_refuses_rank3_matmul_concat_on_axis1():
    g = G()
    x = g.input("x", ["N", 3, C])
    outs = [g.node("MatMul", [x, g.rand(f"mm{i}_w", [C, 2])], name=f"mm{i}") for i in range(2)]
    g.output(g.node("Concat", outs, name="cat", axis=1))    # [N, 6, 2]
    model = g.model()
    out, result = run_pass(model, "merge-parallel", merge_parallel)
    assert_same_numbers(model, out)


def test_merge_refuses_branch_that_is_a_graph_output():
    g = G()
    (a, _), y = _two_convs(g, (True, True))
    g.output(y, a)
    model = g.model()
    out, result = run_pass(model, "merge-parallel", merge_parallel)
    assert_same_numbers(model, out)


def test_merge_gemms_with_broadcast_bias():
    g = G()
    x = g.input("x", ["N", C])
    a = g.node("Gemm", [x, g.rand("w0", [3, C]), g.const("b0", np.array([0.5], np.float32))], name="fc0", transB=1)
    b = g.node("Gemm", [x, g.rand("w1", [2, C]), g.rand("b1", [2])], name="fc1", transB=1)
    g.output(g.node("Concat", [a, b], name="cat", axis=1))
    model = g.model()
    out, result = run_pass(model, "merge-parallel", merge_parallel)
    assert_same_numbers(model, out)


def _split_bn(g: G, order=(0, 1), sizes=(2, 4), channels: int = 6):
    x = g.input("x", ["N", channels, 3, 3])
    bounds = np.cumsum((0,) + sizes)
    outs = []
    for i in range(len(sizes)):
        s = g.node("Slice", [x, g.const(f"st{i}", np.array([bounds[i]], np.int64)),
                             g.const(f"en{i}", np.array([bounds[i + 1]], np.int64)),
                             g.const(f"ax{i}", np.array([1], np.int64))], name=f"slice{i}")
        k = sizes[i]
        outs.append(g.node("BatchNormalization", [s, g.rand(f"sc{i}", [k], 0.5, 2), g.rand(f"bi{i}", [k]),
                                                  g.rand(f"mu{i}", [k]), g.rand(f"var{i}", [k], 0.5, 2)],
                           name=f"bn{i}", epsilon=1e-3))
    g.output(g.node("Relu", [g.node("Concat", [outs[i] for i in order], name="cat", axis=1)], name="relu"))
    return g.model()


def test_merge_split_batchnorm():
    model = _split_bn(G())
    out, result = run_pass(model, "merge-parallel", merge_parallel)
    assert [c for c, _ in result.changed] == ["cat"]
    assert ops(out) == ["BatchNormalization", "Relu"]
    bn = out.graph.node[0]
    assert bn.input[0] == "x"
    assert [helper.get_attribute_value(a) for a in bn.attribute if a.name == "epsilon"] == [pytest.approx(1e-3)]
    assert_same_numbers(model, out)


def test_merge_split_batchnorm_out_of_order_is_refused():
    model = _split_bn(G(), order=(1, 0))
    out, result = run_pass(model, "merge-parallel", merge_parallel)
    assert not result.did_change and fingerprint(out) == fingerprint(model)
    [(cand, why)] = result.skipped
    assert "in order" in why


def test_merge_split_batchnorm_partial_cover_is_refused():
    model = _split_bn(G(), sizes=(2, 3), channels=6)
    assert_same_numbers(model, model)   # the hand-built graph is valid
    out, result = run_pass(model, "merge-parallel", merge_parallel)
    assert not result.did_change and fingerprint(out) == fingerprint(model)


# --------------------------------------------------------------------------------------------------
# cleanup


def test_cleanup_removes_identity_and_dropout():
    g = G()
    y = g.node("Identity", [g.input("x", ["N", C])], name="ident")
    y = g.node("Relu", [y], name="relu")
    y = g.node("Dropout", [y], name="drop")
    y = g.node("Identity", [y], name="ident2")
    g.output(g.node("Sigmoid", [y], name="sig"))
    model = g.model()
    out, result = run_pass(model, "cleanup", cleanup)
    assert ops(out) == ["Relu", "Sigmoid"]
    assert {"drop", "ident", "ident2"} <= {c for c, _ in result.changed}
    assert result.skipped == []
    assert_same_numbers(model, out)


def test_cleanup_reports_each_removal_once():
    g = G()
    y = g.node("Identity", [g.input("x", ["N", C])], name="ident")
    g.output(g.node("Relu", [y], name="relu"))
    model = g.model()
    out, result = run_pass(model, "cleanup", cleanup)
    assert ops(out) == ["Relu"]
    assert [c for c, _ in result.changed] == ["ident"]


def test_cleanup_removes_dead_nodes():
    g = G()
    x = g.input("x", ["N", C])
    g.node("Sigmoid", [x], name="dead")
    g.output(g.node("Relu", [x], name="relu"))
    model = g.model()
    out, result = run_pass(model, "cleanup", cleanup)
    assert ops(out) == ["Relu"]
    assert [c for c, _ in result.changed] == ["dead nodes"] and "1 dead node" in result.changed[0][1]
    assert_same_numbers(model, out)


def test_cleanup_keeps_identity_that_produces_a_graph_output():
    g = G()
    y = g.node("Relu", [g.input("x", ["N", C])], name="relu")
    g.output(g.node("Identity", [y], name="ident"))
    model = g.model()
    out, result = run_pass(model, "cleanup", cleanup)
    assert not result.did_change and fingerprint(out) == fingerprint(model)
    [(cand, why)] = result.skipped
    assert cand == "ident" and "graph output" in why


def test_cleanup_keeps_dropout_whose_mask_is_used():
    g = G()
    x = g.input("x", ["N", C])
    g.nodes.append(helper.make_node("Dropout", [x], ["d", "mask"], name="drop"))
    g.output(g.node("Relu", ["d"], name="relu"), g.node("Cast", ["mask"], name="cast", to=TensorProto.FLOAT))
    model = g.model()
    out, result = run_pass(model, "cleanup", cleanup)
    assert "Dropout" in ops(out)
    assert_same_numbers(model, out)


def test_cleanup_folds_concat_of_initializers():
    g = G()
    w = g.node("Concat", [g.rand("w_old", [C, 3]), g.rand("w_new", [C, 2])], name="wcat", axis=1)
    g.output(g.node("MatMul", [g.input("x", ["N", C]), w], name="mm"))
    model = g.model()
    out, result = run_pass(model, "cleanup", cleanup)
    assert ops(out) == ["MatMul"]
    assert init(out, out.graph.node[0].input[1]).shape == (C, M)
    assert [c for c, _ in result.changed] == ["constants"] and "wcat" in result.changed[0][1]
    assert {t.name for t in out.graph.initializer} == {out.graph.node[0].input[1]}   # w_old, w_new dropped
    assert_same_numbers(model, out)


def test_cleanup_on_a_clean_graph_changes_nothing():
    g = G()
    g.output(_gemm(g, _vec(g), C))
    model = g.model()
    out, result = run_pass(model, "cleanup", cleanup)
    assert not result.did_change and result.skipped == [] and fingerprint(out) == fingerprint(model)


# --------------------------------------------------------------------------------------------------
# summarize


def test_summarize_merges_rounds():
    results = [
        PassResult("fold-gamma", changed=[("gn1", "folded")], skipped=[("gn2", "2 consumers"), ("gn3", "old")]),
        PassResult("merge-parallel", changed=[("cat", "merged")]),
        PassResult("fold-gamma", skipped=[("gn1", "no scale left to fold (γ = 1)"), ("gn3", "new")]),
        PassResult("merge-parallel"),
    ]
    [fold, merge] = summarize(results)
    assert fold["pass"] == "fold-gamma" and merge["pass"] == "merge-parallel"
    assert fold["changed"] == [{"candidate": "gn1", "done": "folded"}]
    # gn1: changed in round 1, "nothing left" in round 2 is idempotence, not a skip; gn3: its latest reason.
    assert fold["skipped"] == [{"candidate": "gn2", "reason": "2 consumers"}, {"candidate": "gn3", "reason": "new"}]
    assert merge == {"pass": "merge-parallel", "changed": [{"candidate": "cat", "done": "merged"}], "skipped": []}


def test_summarize_keeps_a_skip_from_the_round_that_changed_the_candidate():
    """A partial fold changes a candidate and skips some of its channels in the same round: both are listed."""
    results = [PassResult("fold-gamma", changed=[("gn", "γ of 2/4")], skipped=[("gn", "2 channel(s) with γ ≤ 0")]),
               PassResult("fold-gamma", skipped=[("gn", "no channel has γ > 0 to pass Relu")])]
    [fold] = summarize(results)
    assert fold["skipped"] == [{"candidate": "gn", "reason": "2 channel(s) with γ ≤ 0"}]


def test_summarize_from_the_pass_manager():
    model = _mixed_model()
    _, results = PassManager([("fold-gamma", fold_gamma)]).run(model)
    assert len(results) == 2 and results[0].did_change and not results[1].did_change
    assert {c for c, _ in results[1].skipped} == {"gn", "gn2"}   # round 2 finds nothing left
    [fold] = summarize(results)
    assert sorted(c["candidate"] for c in fold["changed"]) == ["gn", "gn2"]
    # gn folded fully: no skip; gn2 kept its γ ≤ 0 channels in round 1 (listed), round 2's "nothing left" is not.
    assert [s["candidate"] for s in fold["skipped"]] == ["gn2"]
    assert "γ ≤ 0" in fold["skipped"][0]["reason"]


def _widened_after_norm() -> onnx.ModelProto:
    """GrowNorm → old/new Conv branches → Concat: fold-gamma can act only after merge-parallel."""
    g = G()
    x = _img(g)
    a = _conv(g, x, name="conv_old")
    b = _conv(g, x, name="conv_new")
    g.output(g.node("Relu", [g.node("Concat", [a, b], name="cat", axis=1)], name="relu"))
    return g.model()


def test_merge_then_fold_over_rounds():
    model = _widened_after_norm()
    out, results = PassManager([("fold-gamma", fold_gamma), ("merge-parallel", merge_parallel)]).run(model)
    assert ops(out) == ["GrowNorm", "Conv", "Relu"]
    np.testing.assert_array_equal(gamma_of(out), np.ones(C, np.float32))
    assert_same_numbers(model, out)
    assert "consumers" in results[0].skipped[0][1]      # round 1: two consumers
    assert results[1].did_change and results[2].did_change  # merged, then folded in round 2


def test_summarize_drops_a_stale_skip_of_a_candidate_changed_later():
    model = _widened_after_norm()
    _, results = PassManager([("fold-gamma", fold_gamma), ("merge-parallel", merge_parallel)]).run(model)
    fold = next(e for e in summarize(results) if e["pass"] == "fold-gamma")
    assert [c["candidate"] for c in fold["changed"]] == ["gn"]
    assert fold["skipped"] == [], fold["skipped"]
