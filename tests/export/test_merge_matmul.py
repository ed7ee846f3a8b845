"""merge-parallel on MatMul-based Linear branches (issue 12 part 1): a Linear on a rank ≥ 3 tensor
exports as MatMul(x, Wᵀ) + Add(bias); a widened one is two (or more) such branches on one x,
concatenated on the last axis. The pass makes them one MatMul (+ one Add). Models are built in
torch, exported with surgeon's exporter, and every pass result is compared with PyTorch in ONNX
Runtime (≤ 1e-5 of the output's scale) and counted (one MatMul, Add and Concat fewer per merge)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from surgeon.export import lean as lean_mod
from surgeon.export.onnx_export import BatchRange, op_counts, to_onnx
from surgeon.export.passes import default_passes
from surgeon.export.passes.base import PassManager
from surgeon.export.passes.merge_parallel import merge_parallel
from surgeon.grow.grownorm import GrowNorm

TOL = 1e-5
SIZE = 16            # images 16×16 → a 4×4 patch grid: 16 tokens of 16 channels


@pytest.fixture(autouse=True, params=[lean_mod.SMALL_TENSOR, 16], ids=["weights-in-proto", "weights-beside-graph"])
def weight_threshold(request, monkeypatch):
    monkeypatch.setattr(lean_mod, "SMALL_TENSOR", request.param)


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got.astype(np.float64) - want).max() / np.abs(want).max())


def ort_out(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph as written
    opts.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]


def err_vs_torch(model: nn.Module, m) -> float:
    """Worst relative error of the ONNX model against PyTorch at batch 1 and 5."""
    proto = m if isinstance(m, onnx.ModelProto) else m.to_proto()
    worst = 0.0
    for batch in (1, 5):
        x = torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            want = model(x).double().numpy()
        worst = max(worst, rel_err(ort_out(proto, x.numpy()), want))
    return worst


def export(model: nn.Module):
    return to_onnx(model.eval(), SIZE, batch=BatchRange(1, 4, 8))


def run_passes(model: nn.Module, lean, manager: PassManager):
    """Run ``manager`` verifying against PyTorch after every pass that changed the graph."""
    checked = []

    def after(name, candidate):
        err = err_vs_torch(model, candidate)
        assert err <= TOL, (name, err)
        checked.append(name)

    out, results = manager.run(lean, after_each=after)
    return out, results, checked


def merge_only() -> PassManager:
    return PassManager([("merge-parallel", merge_parallel)])


def changes(results, name="merge-parallel"):
    return [c for r in results if r.name == name for c in r.changed]


def skips(results, name="merge-parallel"):
    return [s for r in results if r.name == name for s in r.skipped]


# --------------------------------------------------------------------------------------------------
# Models


class Patches(nn.Module):
    """images → [N, T, C] tokens (or [N, H, W, C] channels-last)."""

    def __init__(self, c: int = 16, layout: str = "tokens") -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, c, 4, stride=4)
        self.layout = layout

    def forward(self, x):
        f = self.embed(x)
        return f.flatten(2).transpose(1, 2) if self.layout == "tokens" else f.permute(0, 2, 3, 1)


class Widened(nn.Module):
    """old = Linear(16, 24) and new Linear(16, k) branches (more with ``widths``) on one x,
    concatenated on ``dim``, then GELU, [GrowNorm(axis=-1)], Linear(→10) and a mean over the tokens."""

    def __init__(self, widths=(24, 8), bias=(True, True), dim: int = -1, layout: str = "tokens",
                 norm: bool = False) -> None:
        super().__init__()
        self.patches = Patches(16, layout)
        self.branches = nn.ModuleList(nn.Linear(16, w, bias=b) for w, b in zip(widths, bias))
        self.dim = dim
        total = sum(widths)
        self.norm = GrowNorm(tuple(widths), axis=-1) if norm else nn.Identity()
        self.out = nn.Linear(total, 10)

    def forward(self, x):
        t = self.patches(x)
        h = torch.cat([b(t) for b in self.branches], self.dim)
        y = self.out(self.norm(nn.functional.gelu(h)))
        return y.mean(1) if y.dim() == 3 else y.mean((1, 2))


def build(seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    model = Widened(**kw).eval()
    with torch.no_grad():
        for b in model.branches:
            if b.bias is not None:
                b.bias.uniform_(-1, 1)      # biases large enough that a misplaced one shows
        if isinstance(model.norm, GrowNorm):
            model.norm.gamma.uniform_(0.5, 3.0)
    return model


def concat_axes(proto: onnx.ModelProto) -> list[int]:
    return [helper.get_attribute_value(a) for n in proto.graph.node if n.op_type == "Concat" for a in n.attribute if a.name == "axis"]


def weight(m, name: str) -> np.ndarray:
    if name in m.weights:
        return m.weights[name]
    return next(numpy_helper.to_array(t) for t in m.proto.graph.initializer if t.name == name)


# --------------------------------------------------------------------------------------------------
# What merges


@pytest.mark.parametrize("bias", [(True, True), (True, False), (False, True), (False, False)],
                         ids=["both-biased", "old-biased", "new-biased", "no-bias"])
def test_two_token_branches_merge_into_one_matmul(bias):
    model = build(bias=bias)
    lean = export(model)
    before = op_counts(lean)
    assert before["MatMul"] == 3 and before["Concat"] == 1
    assert err_vs_torch(model, lean) <= TOL
    out, results, checked = run_passes(model, lean, merge_only())
    after = op_counts(out)
    [(_, what)] = changes(results)
    assert "merged branches" in what and checked == ["merge-parallel"]
    assert after["MatMul"] == before["MatMul"] - 1 and "Concat" not in after
    # one Add for the merged bias where either branch had one (zeros for the other), none otherwise;
    # GELU's own Add and the head's bias Add stay
    assert after["Add"] == before["Add"] - sum(bias) + (1 if any(bias) else 0)
    merged = next(n for n in out.proto.graph.node if n.op_type == "MatMul" and n.name.endswith("_merged"))
    w = weight(out, merged.input[1])
    assert w.shape == (16, 32)
    np.testing.assert_array_equal(w, torch.cat([b.weight for b in model.branches]).detach().numpy().T)
    if any(bias):
        add = next(n for n in out.proto.graph.node if n.input and n.input[0] == merged.output[0])
        assert add.op_type == "Add"
        want = np.concatenate([b.bias.detach().numpy() if b.bias is not None else np.zeros(b.out_features, np.float32)
                               for b in model.branches])
        np.testing.assert_array_equal(weight(out, add.input[1]), want)
    assert err_vs_torch(model, out) <= TOL


def test_three_branches_merge_into_one():
    model = build(widths=(24, 8, 4), bias=(True, False, True))
    lean = export(model)
    before = op_counts(lean)
    out, results, _ = run_passes(model, lean, merge_only())
    after = op_counts(out)
    assert len(changes(results)) == 1
    assert after["MatMul"] == before["MatMul"] - 2 and after["Add"] == before["Add"] - 1 and "Concat" not in after
    assert err_vs_torch(model, out) <= TOL


@pytest.mark.parametrize("layout,dim", [("tokens", 2), ("channels-last", -1), ("channels-last", 3)])
def test_concat_axis_as_rank_minus_one_and_channels_last(layout, dim):
    """The Concat's axis as -1 or rank-1, on [N, T, C] and [N, H, W, C]."""
    model = build(layout=layout, dim=dim)
    lean = export(model)
    assert concat_axes(lean.proto) in ([dim], [-1])
    before = op_counts(lean)
    out, results, _ = run_passes(model, lean, merge_only())
    assert len(changes(results)) == 1 and op_counts(out)["MatMul"] == before["MatMul"] - 1
    assert err_vs_torch(model, out) <= TOL


def test_axis_rank_minus_one_written_literally():
    """torch may spell dim=2 as -1; a hand-written Concat(axis=2) on rank 3 merges too."""
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 5, 4])
    inits = [numpy_helper.from_array(rng.normal(size=s).astype(np.float32), n)
             for n, s in (("w0", (4, 3)), ("b0", (3,)), ("w1", (4, 2)), ("b1", (1, 1, 2)))]
    nodes = [helper.make_node("MatMul", ["images", "w0"], ["m0"], name="mm0"),
             helper.make_node("Add", ["m0", "b0"], ["a0"], name="add0"),
             helper.make_node("MatMul", ["images", "w1"], ["m1"], name="mm1"),
             helper.make_node("Add", ["b1", "m1"], ["a1"], name="add1"),       # bias first
             helper.make_node("Concat", ["a0", "a1"], ["y"], name="cat", axis=2)]
    graph = helper.make_graph(nodes, "g", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    out, results = merge_only().run(model)
    assert len(changes(results)) == 1 and [n.op_type for n in out.graph.node] == ["MatMul", "Add"]
    feed = rng.normal(size=(3, 5, 4)).astype(np.float32)
    want, got = ort_out(model, feed), ort_out(out, feed)
    assert rel_err(got, want.astype(np.float64)) <= TOL


def test_merge_is_idempotent():
    model = build()
    out, _, _ = run_passes(model, export(model), merge_only())
    again, results, checked = run_passes(model, out, merge_only())
    assert not changes(results) and not skips(results) and not checked
    assert op_counts(again) == op_counts(out)


# --------------------------------------------------------------------------------------------------
# What is refused, and why (the graph unchanged, the numbers those of PyTorch)


class Refused(Widened):
    """Two branches that must not merge, one way per ``case``."""

    def __init__(self, case: str) -> None:
        super().__init__(widths=(24, 8) if case != "tokens" else (24, 24))
        self.case = case
        self.pos = nn.Parameter(torch.randn(16, 8))     # per-token, per-channel: not a bias
        self.other = nn.Linear(16, 16)
        if case == "tokens":
            self.out = nn.Linear(24, 10)
        if case in ("per-token-add", "variable-add", "dynamic-weight"):
            self.branches[1] = nn.Linear(16, 8, bias=False)

    def forward(self, x):
        t = self.patches(x)
        old, new = self.branches
        a = old(t)
        if self.case == "inputs":                       # the new branch reads another tensor
            b = new(self.other(t))
        elif self.case == "tokens":                     # concatenated on the token axis
            b = new(t)
        elif self.case == "per-token-add":
            b = new(t) + self.pos
        elif self.case == "variable-add":
            b = new(t) + t[..., :8]
        else:                                            # "dynamic-weight": computed at run time
            b = t @ (new.weight.t() * t.abs().mean())
        h = torch.cat([a, b], 1 if self.case == "tokens" else -1)
        y = self.out(nn.functional.gelu(h))
        return y.mean(1)


REFUSALS = {
    "inputs": "read different inputs",
    "tokens": "not concatenated on features (the last axis): axis 1 of rank 3",
    "per-token-add": "not broadcast over the last dim only",
    "variable-add": "is not a constant (not a bias)",
    "dynamic-weight": "weight is not a constant initializer",
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusals_say_why_and_leave_the_graph(case):
    torch.manual_seed(0)
    model = Refused(case).eval()
    lean = export(model)
    before = op_counts(lean)
    out, results, checked = run_passes(model, lean, merge_only())
    assert not changes(results) and not checked and op_counts(out) == before
    reasons = [why for _, why in skips(results)]
    assert len(reasons) == 1 and REFUSALS[case] in reasons[0], reasons
    assert err_vs_torch(model, out) <= TOL


def test_branch_with_a_second_consumer_is_refused():
    class Tapped(Widened):
        def forward(self, x):
            t = self.patches(x)
            a, b = (br(t) for br in self.branches)
            y = self.out(nn.functional.gelu(torch.cat([a, b], -1))).mean(1)
            return y + a.mean((1, 2)).unsqueeze(1)      # the old branch's output is read again

    torch.manual_seed(0)
    model = Tapped().eval()
    out, results, _ = run_passes(model, export(model), merge_only())
    assert not changes(results)
    assert any("other consumers" in why for _, why in skips(results))
    assert err_vs_torch(model, out) <= TOL


# --------------------------------------------------------------------------------------------------
# fold-gamma + merge-parallel: a grown token model costs what the plain one does


class Plain(nn.Module):
    """The same widths without growth: Linear(16, 32) → GELU → Linear(32, 10) → mean."""

    def __init__(self, layers: int = 1) -> None:
        super().__init__()
        self.patches = Patches()
        self.fc = nn.ModuleList(nn.Linear(16, 32) for _ in range(layers))
        self.down = nn.ModuleList(nn.Linear(32, 16) for _ in range(layers - 1))
        self.out = nn.Linear(32, 10)

    def forward(self, x):
        t = self.patches(x)
        for i, fc in enumerate(self.fc):
            h = nn.functional.gelu(fc(t))
            if i < len(self.down):
                t = self.down[i](h)
        return self.out(h).mean(1)


class TwoGrown(nn.Module):
    """Two widened MLP Linears in a row (old 24 + new 8 each), GrowNorm(axis=-1) after each GELU."""

    def __init__(self) -> None:
        super().__init__()
        self.patches = Patches()
        self.old = nn.ModuleList(nn.Linear(16, 24) for _ in range(2))
        self.new = nn.ModuleList(nn.Linear(16, 8) for _ in range(2))
        self.norms = nn.ModuleList(GrowNorm((24, 8), axis=-1) for _ in range(2))
        self.down = nn.Linear(32, 16)
        self.out = nn.Linear(32, 10)

    def forward(self, x):
        t = self.patches(x)
        h = self.norms[0](nn.functional.gelu(torch.cat([self.old[0](t), self.new[0](t)], -1)))
        t = self.down(h)
        h = self.norms[1](nn.functional.gelu(torch.cat([self.old[1](t), self.new[1](t)], -1)))
        return self.out(h).mean(1)


def _gammas(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, GrowNorm):
                m.gamma.uniform_(0.5, 3.0)
            elif isinstance(m, nn.Linear):
                m.bias.uniform_(-1, 1)
    return model


@pytest.mark.parametrize("grown,plain", [(lambda: build(norm=True), lambda: Plain(1)),
                                         (lambda: _gammas(TwoGrown()), lambda: Plain(2))],
                         ids=["one-grown-linear", "two-grown-linears"])
def test_fold_and_merge_give_one_matmul_per_grown_linear(grown, plain):
    torch.manual_seed(0)
    model = _gammas(grown().eval())
    lean = export(model)
    before = op_counts(lean)
    out, results, checked = run_passes(model, lean, default_passes(True))
    after = op_counts(out)
    grown_linears = sum(1 for r in results for c in r.changed if r.name == "merge-parallel")
    assert grown_linears == before["Concat"] and "Concat" not in after
    assert "fold-gamma" in checked and "merge-parallel" in checked
    assert after["MatMul"] == before["MatMul"] - grown_linears
    for t in out.proto.graph.initializer:                 # every γ went into the next MatMul's rows
        if "gamma_residual" in t.name:
            assert np.all(numpy_helper.to_array(t) == 1)
    assert err_vs_torch(model, out) <= TOL
    torch.manual_seed(0)
    flat = plain().eval()
    flat_ops = op_counts(default_passes(True).run(export(flat))[0])
    assert after["MatMul"] == flat_ops["MatMul"] and after["Add"] == flat_ops["Add"]
    assert {k: v for k, v in after.items() if k != "surgeon::GrowNorm"} == flat_ops
