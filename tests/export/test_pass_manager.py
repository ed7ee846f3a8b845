"""The pass manager on one graph and the pattern/check/rewrite rules (surgeon.export.passes.rules)."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from surgeon.export import lean as lean_mod
from surgeon.export.lean import LeanModel
from surgeon.export.passes import base, default_passes
from surgeon.export.passes.graph import import_graph
from surgeon.export.passes.rules import Rule, rule_pass
from tests.export.test_passes import _mixed_model, assert_same_numbers, fingerprint, ops


def test_the_model_is_imported_once_for_all_passes_and_rounds(monkeypatch):
    monkeypatch.setattr(lean_mod, "SMALL_TENSOR", 16)
    calls = []
    monkeypatch.setattr(base, "import_graph", lambda m: calls.append(1) or import_graph(m))
    model = _mixed_model()
    lean = LeanModel.from_proto(model)
    seen = []
    out, results = default_passes().run(lean, after_each=lambda name, m: seen.append((name, ops(m.proto))))
    assert len(calls) == 1
    assert len(results) > len(default_passes().passes)  # more than one round ran on that graph
    assert seen and seen[0][0] == "cleanup" and "Identity" not in seen[0][1]  # each stage as it was then
    assert out is lean
    assert_same_numbers(model, out.to_proto())


def test_a_round_without_changes_exports_nothing(monkeypatch):
    model = _mixed_model()
    once, _ = default_passes().run(model)
    exports = []
    monkeypatch.setattr(base, "export_graph", lambda g, t: exports.append(1))
    twice, results = default_passes().run(once)
    assert exports == [] and not any(r.did_change for r in results)
    assert fingerprint(twice) == fingerprint(once)


def _relu_rules(calls: list[str]) -> list[Rule]:
    def refuse_named_keep(graph: gs.Graph, node: gs.Node):
        if node.op != "Relu":
            return None
        if node.name == "keep":
            return "named keep"
        return None  # not this rule's pattern: the next rule decides

    def drop(graph: gs.Graph, node: gs.Node):
        def rewrite() -> None:
            calls.append(node.name)
            src, out = node.inputs[0], node.outputs[0]
            for consumer in list(out.outputs):
                consumer.inputs = [src if t is out else t for t in consumer.inputs]
            node.outputs.clear()
        return rewrite

    return [Rule("Relu", refuse_named_keep, "unused"), Rule("Relu", drop, "dropped {}")]


def _relus() -> gs.Graph:
    x = gs.Variable("x", np.float32, [2])
    a, b, y = (gs.Variable(n, np.float32, [2]) for n in ("a", "b", "y"))
    nodes = [gs.Node("Relu", "keep", inputs=[x], outputs=[a]), gs.Node("Relu", "go", inputs=[a], outputs=[b]),
             gs.Node("Neg", "neg", inputs=[b], outputs=[y])]
    return gs.Graph(nodes, [x], [y])


def test_rules_first_match_decides_and_a_refusal_rewrites_nothing():
    calls: list[str] = []
    graph = _relus()
    result = rule_pass("drop-relu", _relu_rules(calls))(graph)
    assert result.skipped == [("keep", "named keep")]
    assert result.changed == [("go", "dropped go")] and calls == ["go"]
    graph.cleanup()
    assert [n.name for n in graph.nodes] == ["keep", "neg"]
