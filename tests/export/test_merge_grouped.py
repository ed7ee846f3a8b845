"""merge-grouped: a widened depthwise / grouped conv exports as grouped convs on consecutive
channel slices, concatenated; the pass makes them one grouped conv. Models are built in torch
(slices of one tensor, each through its own grouped conv, cat on channels), exported with surgeon's
exporter, and every pass result is compared with PyTorch in ONNX Runtime (≤ 1e-5 of the output's
scale) and counted; refusals carry their reason and leave the graph as it was."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from surgeon.export.onnx_export import op_counts
from surgeon.export.passes import default_passes
from surgeon.export.passes.base import PassManager
from surgeon.export.passes.merge_grouped import merge_grouped
from surgeon.grow.grownorm import GrowNorm

from tests.export.test_merge_matmul import SIZE, TOL, changes, err_vs_torch, export, run_passes, skips

C_OLD, C_NEW = 24, 8


class SplitGrouped(nn.Module):
    """1x1 expansion to 32 channels → slices [0, 24) and [24, 32) → one grouped conv each → cat →
    [GrowNorm] → SiLU → 1x1 projection → mean: a widened depthwise block as growth exports it."""

    def __init__(self, group_width=(1, 1), kernels=(3, 3), bias=(False, False), bounds=(C_OLD, C_OLD, C_NEW),
                 norm: bool = False) -> None:
        super().__init__()
        self.expand = nn.Conv2d(3, C_OLD + C_NEW, 1)
        self.bounds = bounds
        widths = (C_OLD, C_NEW)
        self.branches = nn.ModuleList(
            nn.Conv2d(w, w, k, padding=k // 2, groups=w // gw, bias=b)
            for w, gw, k, b in zip(widths, group_width, kernels, bias))
        self.norm = GrowNorm(widths) if norm else nn.Identity()
        self.project = nn.Conv2d(C_OLD + C_NEW, 10, 1)

    def forward(self, x):
        h = self.expand(x)
        a, start, b = self.bounds  # slices [0, a) and [start, start + b)
        parts = [h[:, :a], h[:, start:start + b]]
        y = torch.cat([conv(p) for conv, p in zip(self.branches, parts)], 1)
        return self.project(nn.functional.silu(self.norm(y))).mean((2, 3))


def build(seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    model = SplitGrouped(**kw).eval()
    with torch.no_grad():
        for conv in model.branches:
            conv.weight.normal_(0, 0.5)
            if conv.bias is not None:
                conv.bias.uniform_(-1, 1)   # large enough that a misplaced one shows
        if isinstance(model.norm, GrowNorm):
            model.norm.gamma.uniform_(0.5, 3.0)
    return model


def grouped_only() -> PassManager:
    return PassManager([("merge-grouped", merge_grouped)])


def conv_groups(m) -> list[int]:
    proto = m.proto
    return sorted(next((a.i for a in n.attribute if a.name == "group"), 1) for n in proto.graph.node if n.op_type == "Conv")


@pytest.mark.parametrize("group_width, bias", [((1, 1), (False, False)), ((1, 1), (True, False)),
                                               ((2, 2), (True, True)), ((4, 4), (False, True))],
                         ids=["depthwise", "depthwise-old-bias", "width-2-biased", "width-4-new-bias"])
def test_grouped_convs_on_channel_slices_merge_into_one(group_width, bias):
    model = build(group_width=group_width, bias=bias)
    lean = export(model)
    before = op_counts(lean)
    assert before["Conv"] == 4 and before["Slice"] == 2 and before["Concat"] == 1
    assert err_vs_torch(model, lean) <= TOL
    out, results, checked = run_passes(model, lean, grouped_only())
    after = op_counts(out)
    [(_, what)] = changes(results, "merge-grouped")
    assert "merged grouped convs" in what and checked == ["merge-grouped"]
    assert after["Conv"] == 3 and "Slice" not in after and "Concat" not in after
    # the merged conv has all the groups: 24/w + 8/w, each reading w channels
    assert conv_groups(out) == [1, 1, (C_OLD + C_NEW) // group_width[0]]
    assert err_vs_torch(model, out) <= TOL
    # idempotent: a second run finds nothing to merge and nothing to refuse
    again, results2, _ = run_passes(model, out, grouped_only())
    assert not changes(results2, "merge-grouped") and not skips(results2, "merge-grouped")
    assert op_counts(again) == after


@pytest.mark.parametrize("kw, reason", [
    (dict(kernels=(3, 5)), "differ in kernel"),
    (dict(group_width=(1, 2)), "channels per group"),
    (dict(bounds=(C_OLD, 16, C_NEW)), "do not tile the channels"),
    ("gap", "do not cover all channels"),
], ids=["kernels", "group-widths", "overlap", "gap"])
def test_refusals_say_why_and_change_nothing(kw, reason):
    model = _gap_model() if kw == "gap" else build(**kw)
    lean = export(model)
    before = op_counts(lean)
    out, results, _ = run_passes(model, lean, grouped_only())
    assert not changes(results, "merge-grouped")
    [(_, why)] = skips(results, "merge-grouped")
    assert reason in why
    assert op_counts(out) == before and err_vs_torch(model, out) <= TOL


def _gap_model() -> nn.Module:
    """Slices [0, 20) and [20, 28): channels 28..31 are not read, so one conv on x cannot replace them."""
    model = build()
    model.bounds = (20, 20, 8)
    model.branches[0] = nn.Conv2d(20, 20, 3, padding=1, groups=20)
    model.project = nn.Conv2d(28, 10, 1)
    return model.eval()


def test_default_passes_merge_a_widened_depthwise_after_grownorm():
    """With GrowNorm after the depthwise pair (as EfficientNet growth places it, before SE), the
    default passes still merge the pair; the result agrees with PyTorch after every pass."""
    model = build(norm=True, bias=(True, True))
    lean = export(model)
    out, results, checked = run_passes(model, lean, default_passes(True))
    assert "merge-grouped" in checked
    after = op_counts(out)
    assert after["Conv"] == 3 and "Concat" not in after and after["surgeon::GrowNorm"] == 1
    assert err_vs_torch(model, out) <= TOL


def test_merged_depthwise_builds_with_tensorrt_rtx(tmp_path):
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu12 is not installed")
    from surgeon.export.onnx_export import save_onnx, set_metadata
    from surgeon.trt.build import build_engine

    model = build(norm=True, bias=(True, False))
    out, _, _ = run_passes(model, export(model), default_passes(True))
    assert op_counts(out)["Conv"] == 3
    set_metadata(out.proto, {"surgeon.batch": "1:4:8", "surgeon.precision": "fp32"})
    path = save_onnx(out, tmp_path / "depthwise.onnx")
    report = build_engine(path, builder="tensorrt-rtx")
    assert report.engine_bytes > 10_000 and report.input_shape == [-1, 3, SIZE, SIZE]
