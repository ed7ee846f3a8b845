"""Pass results and rewrite rules, the way onnxscript's rewriter writes them: pattern, check, rewrite.

A :class:`Rule` is rooted at one op type. Offered a node of that type, its function answers in
three ways: ``None`` — the pattern does not match (not a candidate, nothing to report); a string —
the pattern matched but the check refused, saying why; a :data:`Rewrite` — the pattern matched and
the check passed, and calling it edits the graph. Matching and checking never edit the graph, so a
refusal leaves it exactly as it was. :func:`rule_pass` turns an ordered list of rules into a pass:
for every anchor node, the first rule whose pattern matches decides.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import onnx_graphsurgeon as gs


@dataclass
class PassResult:
    name: str
    changed: list[tuple[str, str]] = field(default_factory=list)  # (candidate, what was done)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (candidate, why not)

    @property
    def did_change(self) -> bool:
        return bool(self.changed)


GraphPass = Callable[[gs.Graph], PassResult]
Rewrite = Callable[[], None]
# pattern + check over one anchor node: None (no match), a reason (refused) or the rewrite to run.
Matcher = Callable[[gs.Graph, gs.Node], "str | Rewrite | None"]


@dataclass(frozen=True)
class Rule:
    anchor: str           # op type of the node the pattern is rooted at
    match: Matcher
    report: str           # what was done; ``{}`` is filled with the candidate's description
    describe: Callable[[gs.Node], str] = lambda node: node.name

    def apply(self, graph: gs.Graph, node: gs.Node) -> tuple[bool, str] | None:
        """None: no match; (True, what was done) or (False, why not)."""
        found = self.match(graph, node)
        if found is None:
            return None
        if isinstance(found, str):
            return False, found
        what = self.report.format(self.describe(node))  # before the rewrite disconnects the match
        found()
        return True, what


def rule_pass(name: str, rules: list[Rule], candidate: Callable[[gs.Node], bool] = lambda node: True,
              label: Callable[[gs.Node], str] = lambda node: node.name) -> GraphPass:
    """A pass offering every node (that ``candidate`` accepts) to ``rules`` in order; the first rule
    whose pattern matches decides. ``label`` names a refused candidate in the report."""
    anchors = {r.anchor for r in rules}

    def run(graph: gs.Graph) -> PassResult:
        result = PassResult(name)
        for node in [n for n in graph.nodes if n.op in anchors and candidate(n)]:
            for rule in rules:
                if rule.anchor != node.op:
                    continue
                outcome = rule.apply(graph, node)
                if outcome is None:
                    continue
                done, what = outcome
                if done:
                    result.changed.append((node.name, what))
                else:
                    result.skipped.append((label(node), what))
                break
        return result

    run.__name__ = name.replace("-", "_")
    return run


# -- rules over a Concat of branches (merge-parallel, merge-grouped) --------------------------------

def concat_producers(concat: gs.Node) -> str:
    return ", ".join(t.inputs[0].name for t in concat.inputs)


def _is_branch_concat(node: gs.Node) -> bool:
    return bool(node.outputs) and all(t.inputs for t in node.inputs)


def concat_rule(match: Matcher, report: str) -> Rule:
    """A rule rooted at a Concat whose inputs all have producers; ``report``'s ``{}`` gets them."""
    return Rule("Concat", match, report, concat_producers)


def concat_rule_pass(name: str, rules: list[Rule]) -> GraphPass:
    return rule_pass(name, rules, _is_branch_concat, lambda n: f"{n.name} ({concat_producers(n)})")
