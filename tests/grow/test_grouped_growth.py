"""Growth through grouped convs (ResNeXt, RegNet): widening the 1x1 conv that feeds a grouped conv
by k = m·w units (w: the grouped conv's input channels per group) gives the grouped conv m whole new
groups, whose m·(out/g) new channels reach the next 1x1 conv as new input columns; the one GrowNorm
goes after the grouped conv's BatchNorm/ReLU. Other unit counts, and the grouped conv itself, are
refused with the valid counts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.regnet import BlockParams, RegNet
from torchvision.models.resnet import Bottleneck, ResNet

from surgeon.errors import GrowthError
from surgeon.grow.analysis import trace
from surgeon.grow.gamma import calibrate_gamma
from surgeon.grow.grownorm import GrowNorm
from surgeon.grow.modules import ExtendedConv2d, GroupWidened, SplitBatchNorm, Widened
from surgeon.grow.ops import GrowthState, apply_steps
from surgeon.grow.recipe import GrowStep, HeadStep

from tests.grow.helpers import (Capture, builds_with_rtx, export_verified, grow, grown_checkpoint, images,
                                randomize_batchnorms)

SIZE = 32


def make_resnext() -> nn.Module:
    torch.manual_seed(0)  # groups=4 of width 8 in layer2 (4 in layer1)
    return randomize_batchnorms(ResNet(Bottleneck, [1, 1, 1, 1], groups=4, width_per_group=4, num_classes=10), 1).eval()


def make_regnet() -> nn.Module:
    torch.manual_seed(0)  # block2: 32 channels in groups of 8
    return randomize_batchnorms(RegNet(BlockParams.from_init_params(depth=3, w_0=16, w_a=8.0, w_m=2.0, group_width=8),
                                       num_classes=10), 1).eval()


# name: (build, layer grown, grouped conv, its consumer, its BatchNorm, group width in, group width out)
FAMILIES = {
    "resnext": (make_resnext, "layer2.0.conv1", "layer2.0.conv2", "layer2.0.conv3", "layer2.0.bn2", 8, 8),
    "regnet": (make_regnet, "trunk_output.block2.block2-1.f.a.0", "trunk_output.block2.block2-1.f.b.0",
               "trunk_output.block2.block2-1.f.c.0", "trunk_output.block2.block2-1.f.b.1", 8, 8),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    return request.param, FAMILIES[request.param][0](), *FAMILIES[request.param][1:]


@pytest.mark.parametrize("units", [8, 24])
def test_structure(family, units):
    _, model, layer, conv, consumer, bn, w, w_out = family
    old = model.get_submodule(conv)
    gm, state = grow(model, [GrowStep("wide", layer, units)], SIZE)
    grown = gm.get_submodule(conv)
    assert isinstance(gm.get_submodule(layer), Widened) and isinstance(grown, GroupWidened)
    assert torch.equal(grown.old.weight, old.weight) and grown.split == old.in_channels
    assert grown.new.groups == units // w and grown.new.in_channels == units
    assert grown.new.out_channels == units // w * w_out
    assert isinstance(gm.get_submodule(bn), SplitBatchNorm)
    c3 = gm.get_submodule(consumer)
    assert isinstance(c3, ExtendedConv2d) and c3.weight_extra.shape[1] == units // w * w_out
    (norm,) = state.norms
    gn = gm.get_submodule(norm)
    assert tuple(gn.groups) == (old.out_channels, units // w * w_out)
    node = next(n for n in gm.graph.nodes if n.op == "call_module" and str(n.target) == norm)
    assert [str(u.target) for u in node.users] == [consumer]  # right before the 1x1 conv that mixes them
    with torch.no_grad():
        assert gm(images(2, SIZE)).shape == (2, 10)


@pytest.mark.parametrize("init", ["net2net", "zero"])
def test_net2net_and_zero_preserve_function(family, init):
    _, model, layer, _, consumer, *_ = family
    x = images(4, SIZE)
    cap = Capture(model.get_submodule(consumer))
    with torch.no_grad():
        ref = model(x)
    block_ref = cap.value
    cap.remove()
    torch.manual_seed(3)
    gm, _ = grow(model, [GrowStep("wide", layer, 16, init=init, norm=False)], SIZE)
    cap = Capture(gm.get_submodule(consumer))
    with torch.no_grad():
        y = gm(x)
    assert float((cap.value - block_ref).abs().max() / block_ref.abs().max()) < 1e-5
    assert float((y - ref).abs().max() / ref.abs().max()) < 1e-5


def test_random_init_changes_the_block(family):
    _, model, layer, _, consumer, *_ = family
    x = images(4, SIZE)
    cap = Capture(model.get_submodule(consumer))
    with torch.no_grad():
        model(x)
    block_ref = cap.value
    cap.remove()
    torch.manual_seed(3)
    gm, _ = grow(model, [GrowStep("wide", layer, 16, init="random", norm=False)], SIZE)
    cap = Capture(gm.get_submodule(consumer))
    with torch.no_grad():
        gm(x)
    assert float((cap.value - block_ref).abs().max() / block_ref.abs().max()) > 1e-3


def test_net2net_new_groups_copy_old_groups(family):
    _, model, layer, conv, *_ = family
    torch.manual_seed(5)
    gm, _ = grow(model, [GrowStep("wide", layer, 16, init="net2net")], SIZE)
    grown = gm.get_submodule(conv)
    w_out = grown.old.out_channels // grown.old.groups
    old = grown.old.weight.reshape(grown.old.groups, w_out, *grown.old.weight.shape[1:])
    for group in grown.new.weight.reshape(grown.new.groups, w_out, *grown.new.weight.shape[1:]):
        assert any(torch.equal(group, o) for o in old)


@pytest.mark.parametrize("units", [1, 4, 12])
def test_units_not_a_multiple_of_the_group_width_are_refused(family, units):
    _, model, layer, conv, *_ = family
    gm = trace(model)
    with pytest.raises(GrowthError) as exc:
        apply_steps(gm, [GrowStep("wide", layer, units)], GrowthState(input_size=SIZE))
    msg = str(exc.value)
    assert f"cannot grow '{layer}' by {units} units" in msg and f"grouped conv {conv}" in msg
    assert "use --units 8, 16, 24 or another multiple of 8" in msg and "\n" not in msg
    assert not any(isinstance(m, (Widened, GrowNorm)) for m in gm.modules())  # left as it was


def test_the_grouped_conv_itself_is_refused_naming_its_feeder(family):
    _, model, layer, conv, *_ = family
    with pytest.raises(GrowthError) as exc:
        grow(model, [GrowStep("wide", conv, 8)], SIZE)
    msg = str(exc.value)
    assert f"'{conv}' is a grouped conv" in msg and f"widen '{layer}' by 8, 16, 24" in msg
    assert "growable layers" in msg and layer in msg.split("growable layers: ")[1]


def test_grouped_conv_into_a_residual_add_is_refused():
    class Block(nn.Module):  # the grouped conv's output feeds the add: its new groups have nowhere to go
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.skip = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.Conv2d(3, 8, 1)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            y = self.b(torch.relu(self.a(x))) + self.skip(x)
            return self.head(y.mean((2, 3)))

    with pytest.raises(GrowthError, match=r"cannot grow 'a': it feeds the grouped conv b, which grows with it, but "
                                          r"b's output feeds a residual add"):
        grow(Block().eval(), [GrowStep("wide", "a", 4)], 8)


def test_one_finetuning_step_trains_new_groups(family):
    from surgeon.train.params import apply_freeze, split_parameters

    _, model, layer, conv, consumer, *_ = family
    torch.manual_seed(1)
    gm, state = grow(model, [HeadStep(classes=3), GrowStep("wide", layer, 16)], SIZE)
    calibrate_gamma(gm, images(8, SIZE, seed=2))
    split = split_parameters(gm, state, "top")
    assert {f"{layer}.new.weight", f"{conv}.new.weight", f"{state.norms[0]}.gamma", f"{consumer}.weight_extra"} <= set(split.new)
    assert f"{conv}.old.weight" in split.pretrained and f"{consumer}.weight" in split.pretrained
    apply_freeze(gm, split)
    opt = torch.optim.SGD([{"params": list(split.pretrained.values())},
                           {"params": list(split.new.values()), "lr": 0.1}], lr=0.01, momentum=0.9)
    gm.train()
    x, y = images(6, SIZE, seed=3), torch.tensor([0, 1, 2, 0, 1, 2])
    loss = F.cross_entropy(gm(x), y)
    loss.backward()
    for name, p in split.new.items():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    before = gm.get_submodule(conv).new.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, gm.get_submodule(conv).new.weight)
    gm.eval()
    with torch.no_grad():
        assert torch.isfinite(gm(x)).all()


def _checkpoint(tmp_path, name: str, init: str = "random"):
    build, layer, *_ = FAMILIES[name]
    return grown_checkpoint(tmp_path / "grown.pt", build(), layer, 16, init,
                            f"tests.grow.test_grouped_growth:make_{name}", SIZE)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_checkpoint_rebuild_gives_identical_outputs(tmp_path, name):
    from surgeon.checkpoint import load_model

    path, gm = _checkpoint(tmp_path, name, "net2net")
    rebuilt = load_model(path, trust_code=True).eval()
    assert rebuilt.get_submodule(FAMILIES[name][2]).split == gm.get_submodule(FAMILIES[name][2]).split
    x = images(3, SIZE, seed=4)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), gm(x))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_export_verifies(tmp_path, name):
    path, _ = _checkpoint(tmp_path, name)
    builds_with_rtx(export_verified(path, tmp_path / "model.onnx").path)
