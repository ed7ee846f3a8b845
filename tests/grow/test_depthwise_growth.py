"""Coupled growth through depthwise convs and squeeze-excitation (MobileNetV2/V3, EfficientNet,
MNASNet, ShuffleNetV2, RegNet-Y): widening the 1x1 expansion conv that feeds a depthwise conv gives
the depthwise conv one new filter per new channel (its BatchNorm new channels), a squeeze-excitation
on the way a new gate per new channel (new input columns of the squeeze, new outputs of the excite),
and the projection conv new input columns; the one GrowNorm goes after the depthwise conv's chain,
where old and new channels first meet a cross-channel op (the squeeze, the projection)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from surgeon.grow.gamma import calibrate_gamma
from surgeon.grow.grownorm import GrowNorm
from surgeon.grow.modules import ExtendedConv2d, GroupWidened, Widened
from surgeon.grow.recipe import GrowStep, HeadStep

from tests.grow.helpers import (builds_with_rtx, export_verified, finetune_one_step, grow, grown_checkpoint, images,
                                randomize_batchnorms)

SIZE = 32
UNITS = 12


def _seeded(build) -> nn.Module:
    torch.manual_seed(0)
    return randomize_batchnorms(build(), 1).eval()


def make_mobilenet_v3() -> nn.Module:
    return _seeded(lambda: torchvision.models.mobilenet_v3_small(width_mult=0.5, num_classes=10))


def make_efficientnet() -> nn.Module:
    return _seeded(lambda: torchvision.models.efficientnet_b0(num_classes=10))


def make_mnasnet() -> nn.Module:
    return _seeded(lambda: torchvision.models.mnasnet0_5(num_classes=10))


def make_shufflenet() -> nn.Module:
    return _seeded(lambda: torchvision.models.shufflenet_v2_x0_5(num_classes=10))


def make_regnet_y() -> nn.Module:
    from torchvision.models.regnet import BlockParams, RegNet

    params = BlockParams.from_init_params(depth=3, w_0=16, w_a=8.0, w_m=2.0, group_width=8, se_ratio=0.25)
    return _seeded(lambda: RegNet(params, num_classes=10))


# family: (factory, expansion conv, the depthwise/grouped conv, its consumer, the excite or None)
FAMILIES = {
    "mobilenet_v3": (make_mobilenet_v3, "features.11.block.0.0", "features.11.block.1.0", "features.11.block.3.0",
                     "features.11.block.2.fc2"),
    "efficientnet": (make_efficientnet, "features.7.0.block.0.0", "features.7.0.block.1.0", "features.7.0.block.3.0",
                     "features.7.0.block.2.fc2"),
    "mnasnet": (make_mnasnet, "layers.13.0.layers.0", "layers.13.0.layers.3", "layers.13.0.layers.6", None),
    "shufflenet": (make_shufflenet, "stage4.3.branch2.0", "stage4.3.branch2.3", "stage4.3.branch2.5", None),
    "regnet_y": (make_regnet_y, "trunk_output.block2.block2-1.f.a.0", "trunk_output.block2.block2-1.f.b.0",
                 "trunk_output.block2.block2-1.f.c.0", "trunk_output.block2.block2-1.f.se.fc2"),
}
FAST = ["mobilenet_v3", "mnasnet", "shufflenet", "regnet_y"]  # efficientnet-b0 (5 M params) only where it matters


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    return request.param, FAMILIES[request.param][0](), *FAMILIES[request.param][1:]


def _units(name: str) -> int:
    return 16 if name == "regnet_y" else UNITS  # RegNet-Y's grouped conv: whole groups of 8


def test_structure(family):
    name, model, layer, dw, consumer, excite = family
    old = model.get_submodule(dw)
    k = _units(name)
    gm, state = grow(model, [GrowStep("wide", layer, k)], SIZE)
    grown = gm.get_submodule(dw)
    assert isinstance(gm.get_submodule(layer), Widened) and isinstance(grown, GroupWidened)
    assert torch.equal(grown.old.weight, old.weight) and grown.split == old.in_channels
    w = old.in_channels // old.groups
    assert grown.new.groups == k // w and grown.new.in_channels == k
    assert isinstance(gm.get_submodule(consumer), ExtendedConv2d)
    assert gm.get_submodule(consumer).weight_extra.shape[1] == grown.new.out_channels
    if excite is not None:
        ex = gm.get_submodule(excite)
        assert isinstance(ex, Widened) and ex.new.out_channels == grown.new.out_channels
    (norm,) = state.norms
    assert gm.get_submodule(norm).groups == (old.out_channels, grown.new.out_channels)


@pytest.mark.parametrize("init", ["net2net", "zero"])
def test_net2net_and_zero_preserve_function(family, init):
    name, model, layer, *_ = family
    x = images(3, SIZE, seed=5)
    with torch.no_grad():
        ref = model(x)
    torch.manual_seed(2)
    gm, _ = grow(model, [GrowStep("wide", layer, _units(name), init=init, norm=False)], SIZE)
    with torch.no_grad():
        y = gm(x)
    assert float((y - ref).abs().max() / ref.abs().max()) <= 1e-5


def test_random_init_changes_the_block(family):
    name, model, layer, *_ = family
    x = images(3, SIZE, seed=5)
    with torch.no_grad():
        ref = model(x)
    torch.manual_seed(2)
    gm, _ = grow(model, [GrowStep("wide", layer, _units(name), init="random", norm=False)], SIZE)
    with torch.no_grad():
        assert not torch.allclose(gm(x), ref, atol=1e-6)


def test_net2net_new_gates_copy_old_gates():
    """The excite's new outputs are copies of the gates of the channels the new ones copy."""
    model = make_mobilenet_v3()
    _, layer, dw, _, excite = FAMILIES["mobilenet_v3"]
    torch.manual_seed(3)
    gm, _ = grow(model, [GrowStep("wide", layer, UNITS, init="net2net")], SIZE)
    ex = gm.get_submodule(excite)
    rows = [(ex.old.weight == ex.new.weight[i]).all(dim=tuple(range(1, ex.old.weight.dim()))).nonzero().flatten()
            for i in range(UNITS)]
    assert all(len(r) >= 1 for r in rows)
    conv = gm.get_submodule(dw)
    for i, r in enumerate(rows):  # the depthwise filter of new channel i is the copied channel's
        assert any(torch.equal(conv.new.weight[i], conv.old.weight[j]) for j in r.tolist())


def test_one_finetuning_step_trains_new_units(family):
    name, model, layer, dw, consumer, excite = family
    torch.manual_seed(1)
    gm, state = grow(model, [HeadStep(classes=3), GrowStep("wide", layer, _units(name))], SIZE)
    split, moved = finetune_one_step(gm, state, SIZE)
    trained = {f"{layer}.new.weight", f"{dw}.new.weight", f"{consumer}.weight_extra", f"{state.norms[0]}.gamma"}
    if excite is not None:
        trained.add(f"{excite}.new.weight")
    assert trained <= set(split.new) and trained <= moved


def _checkpoint(tmp_path, name: str, init: str = "random"):
    build, layer, *_ = FAMILIES[name]
    return grown_checkpoint(tmp_path / "grown.pt", build(), layer, _units(name), init,
                            f"tests.grow.test_depthwise_growth:make_{name}", SIZE)


@pytest.mark.parametrize("name", FAST)
def test_checkpoint_rebuild_gives_identical_outputs(tmp_path, name):
    from surgeon.checkpoint import load_model

    path, gm = _checkpoint(tmp_path, name, "net2net")
    rebuilt = load_model(path, trust_code=True).eval()
    x = images(3, SIZE, seed=4)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), gm(x))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_export_verifies_merges_and_builds(tmp_path, name):
    path, _ = _checkpoint(tmp_path, name)
    result = export_verified(path, tmp_path / "model.onnx")
    merged = next(p for p in result.passes if p["pass"] == "merge-grouped")
    assert merged["changed"], merged  # the depthwise/grouped pair is one conv again
    builds_with_rtx(result.path)
