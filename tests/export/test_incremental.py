"""Incremental verification (surgeon.export.incremental): after a pass, only the part it changed runs,
fed with the export run's values of the unchanged tensors — and a change anywhere, also upstream of
where the passes act, is still caught."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from surgeon.errors import SurgeonError
from surgeon.export import lean as lean_mod
from surgeon.export.incremental import IncrementalVerifier, provenance
from surgeon.export.lean import LeanModel
from surgeon.export.passes import default_passes
from surgeon.export.passes.base import PassManager
from surgeon.export.passes.rules import PassResult
from surgeon.export.verify import Reference, verify
from tests.export.test_passes import GROUPS, G, run

C = 4


@pytest.fixture(autouse=True)
def weights_beside_graph(monkeypatch):
    monkeypatch.setattr(lean_mod, "SMALL_TENSOR", 16)


def _widened() -> onnx.ModelProto:
    """Conv → Relu → GrowNorm → Flatten → old/new Gemm branches → Concat: the passes act after the conv."""
    g = G()
    x = g.input("x", ["N", C, 3, 3])
    y = g.node("Conv", [x, g.rand("conv_w", [C, C, 3, 3]), g.rand("conv_b", [C])], name="conv", pads=[1, 1, 1, 1])
    y = g.grownorm(g.node("Relu", [y], name="relu"), g.gamma(C), GROUPS)
    y = g.node("Flatten", [y], name="flat")
    a = g.node("Gemm", [y, g.rand("old_w", [6, C * 9]), g.rand("old_b", [6])], name="old", transB=1)
    b = g.node("Gemm", [y, g.rand("new_w", [3, C * 9]), g.rand("new_b", [3])], name="new", transB=1)
    g.output(g.node("Concat", [a, b], name="cat", axis=1))
    return g.model()


def _reference(model: onnx.ModelProto) -> Reference:
    rng = np.random.default_rng(0)
    cases = []
    for batch in (1, 3):
        x = rng.normal(size=(batch, C, 3, 3)).astype(np.float32)
        cases.append(("random", x, run(model, {"x": x})[0]))
    return Reference(cases)


def test_stages_run_only_what_the_passes_changed():
    model = _widened()
    verifier = IncrementalVerifier(_reference(model))
    lean = LeanModel.from_proto(model)
    checks = verifier.export(lean)
    assert {c.ran for c in checks} == {"whole model"}
    stages = []

    def after(name: str, m: LeanModel) -> None:
        part = verifier.stage(name, m)
        whole = verify(m, verifier.reference, stage=name)
        for p, w in zip(part, whole):  # the part gives the numbers the whole model gives
            assert p.rel_err == pytest.approx(w.rel_err, abs=1e-6)
        stages.append((name, part))

    default_passes().run(lean, after_each=after)
    assert [n for n, _ in stages] == ["merge-parallel", "fold-gamma"]
    for _, part in stages:
        assert all(c.ok and c.ran.startswith("the changed part") for c in part), part
    assert "Conv" in {n.op_type for n in lean.proto.graph.node}


def _corrupt(op: str):
    """A buggy pass: replaces the weight of the first ``op`` node by a perturbed copy under the same name."""
    def bad(graph: gs.Graph) -> PassResult:
        node = next(n for n in graph.nodes if n.op == op)
        w = node.inputs[1]
        node.inputs[1] = gs.Constant(w.name, (w.values * 1.5).astype(w.values.dtype))
        return PassResult("bad", changed=[(node.name, "broke it")])
    return bad


@pytest.mark.parametrize("op", ["Conv", "Gemm"])
def test_a_change_anywhere_is_caught(op):
    """Upstream of every captured tensor (the conv) or inside the cut part (a Gemm): both fail."""
    model = _widened()
    verifier = IncrementalVerifier(_reference(model))
    lean = LeanModel.from_proto(model)
    verifier.export(lean)
    with pytest.raises(SurgeonError, match="bad: ONNX Runtime differs from PyTorch"):
        PassManager([("bad", _corrupt(op))], max_rounds=1).run(lean, after_each=verifier.stage)


def test_provenance_keys_follow_values_not_names():
    model = LeanModel.from_proto(_widened())
    keys = provenance(model)
    assert keys == provenance(LeanModel(model.proto, dict(model.weights)))   # same arrays: same keys
    moved = LeanModel(model.proto, {n: a.copy() for n, a in model.weights.items()})
    changed = provenance(moved)
    assert changed["x"] == keys["x"] and changed["cat_out"] != keys["cat_out"]  # new arrays: new keys downstream
    other = onnx.ModelProto()
    other.CopyFrom(model.proto)
    next(n for n in other.graph.node if n.op_type == "Conv").attribute[0].ints[:] = [0, 0, 0, 0]
    assert provenance(LeanModel(other, model.weights))["relu_out"] != keys["relu_out"]


def test_nothing_captured_runs_the_whole_model():
    model = _widened()
    verifier = IncrementalVerifier(_reference(model), budget=0)
    lean = LeanModel.from_proto(model)
    verifier.export(lean)
    checks = []
    default_passes().run(lean, after_each=lambda n, m: checks.extend(verifier.stage(n, m)))
    assert checks and {c.ran for c in checks} == {"whole model"}


def test_a_captured_output_of_a_node_that_runs_anyway_is_not_fed():
    """Split → (s0, Identity(s1)) → Concat: cleanup drops the Identity; the changed part needs the
    Split for s0, so s1 (captured, as the Identity's input) comes from the Split, not from a feed."""
    g = G()
    s0, s1 = "split_out", "split_out1"
    g.node("Split", [g.input("x", ["N", C, 3, 3]), g.const("sizes", np.array([2, 2], np.int64))], name="split",
           n_out=2, axis=1)
    y = g.node("Concat", [s0, g.node("Identity", [s1], name="ident")], name="cat", axis=1)
    g.output(g.node("Conv", [y, g.rand("conv_w", [C, C, 3, 3])], name="conv", pads=[1, 1, 1, 1]))
    model = g.model()
    verifier = IncrementalVerifier(_reference(model))
    lean = LeanModel.from_proto(model)
    verifier.export(lean)
    checks = []
    default_passes(fold=False).run(lean, after_each=lambda n, m: checks.extend(verifier.stage(n, m)))
    assert [c.stage for c in checks] == ["cleanup", "cleanup"] and all(c.ok for c in checks)


def test_only_batched_activations_are_cut_points():
    """A scalar or a constant-derived tensor read by a cut op is never captured and fed (Swin-V2's
    clamped logit scale went through an Identity: fed as rank 1, ONNX Runtime refused it)."""
    from onnx import TensorProto, helper

    from surgeon.export.incremental import _cut_candidates

    nodes = [
        helper.make_node("Constant", [], ["s"], value=helper.make_tensor("v", TensorProto.FLOAT, [], [2.0])),
        helper.make_node("Identity", ["s"], ["s_id"]),                 # rank 0: not a cut point
        helper.make_node("Constant", [], ["w"], value=helper.make_tensor("w0", TensorProto.FLOAT, [4], [1, 2, 3, 4])),
        helper.make_node("Identity", ["w"], ["w_id"]),                 # [4] from constants: not a cut point
        helper.make_node("Mul", ["x", "s_id"], ["xs"]),
        helper.make_node("Mul", ["xs", "w_id"], ["xw"]),
        helper.make_node("Identity", ["xw"], ["y"]),                   # [batch, 4]: the one cut point
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])])
    model = LeanModel.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    assert [name for name, _ in _cut_candidates(model)] == ["xw"]
