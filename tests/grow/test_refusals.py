"""Growth that is ill-defined is refused with one line that says why and what to grow instead."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from surgeon.errors import GrowthError, SurgeonError
from surgeon.grow.analysis import find_site, propagate_shapes, trace
from surgeon.grow.ops import GrowthState, apply_steps
from surgeon.grow.recipe import GrowStep, HeadStep

from tests.grow.helpers import digitnet, torchvision_model


@pytest.fixture(scope="module")
def resnet18():
    return torchvision_model("resnet18")


@pytest.fixture(scope="module")
def mobilenet():
    return torchvision_model("mobilenet_v3_small")


def refuse(model, steps, size=64) -> str:
    gm = trace(model)
    with pytest.raises(GrowthError) as info:
        apply_steps(gm, steps, GrowthState(input_size=size))
    msg = str(info.value)
    assert "\n" not in msg, f"not one line: {msg!r}"
    return msg


def _suggested(msg: str) -> list[str]:
    tail = msg.split("growable layers: ", 1)[1]
    return [s.strip() for s in tail.split(" (and ")[0].split(",")]


def _check_suggestions(model, msg, size=64):
    """Every suggested layer really can be grown (wide, with a replaced head)."""
    names = _suggested(msg)
    assert names and all(names)
    gm = trace(model)
    propagate_shapes(gm, size)
    for n in names:
        find_site(gm, n)


def test_unknown_layer(resnet18):
    msg = refuse(resnet18, [GrowStep("wide", "layer9.conv1", 8)])
    assert "no layer named 'layer9.conv1'" in msg and "growable layers" in msg
    _check_suggestions(resnet18, msg)


@pytest.mark.parametrize("layer", ["layer4.1.conv2", "layer4.0.downsample.0", "conv1"])
@pytest.mark.parametrize("kind", ["wide", "deep"])
def test_residual_add(resnet18, layer, kind):
    msg = refuse(resnet18, [HeadStep(classes=7), GrowStep(kind, layer, 512)])
    assert f"cannot grow '{layer}'" in msg and "residual add" in msg and "growable layers" in msg
    names = _suggested(msg)
    assert layer not in names
    _check_suggestions(resnet18, msg)


def test_depthwise_conv(mobilenet):
    depthwise = [n for n, m in mobilenet.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert depthwise
    layer = depthwise[len(depthwise) // 2]
    msg = refuse(mobilenet, [GrowStep("wide", layer, 8)])
    assert "depthwise" in msg and f"'{layer}'" in msg and "growable layers" in msg
    _check_suggestions(mobilenet, msg)


@pytest.fixture(scope="module")
def resnext():
    from torchvision.models.resnet import Bottleneck, ResNet

    torch.manual_seed(0)  # resnext50_32x4d's structure, reduced: groups=4 of 4·2^i channels
    return ResNet(Bottleneck, [1, 1, 1, 1], groups=4, width_per_group=4, num_classes=10).eval()


def test_grouped_conv_names_its_feeder_and_the_valid_unit_counts(resnext):
    msg = refuse(resnext, [GrowStep("wide", "layer3.0.conv2", 16)])
    assert "'layer3.0.conv2' is a grouped conv (groups=4, 16 input channels per group)" in msg
    assert "widen 'layer3.0.conv1' by 16, 32, 48 or another multiple of 16 units" in msg
    assert "growable layers" in msg
    _check_suggestions(resnext, msg)


@pytest.mark.parametrize("units", [4, 20])
def test_layer_feeding_a_grouped_conv_grows_by_whole_groups_only(resnext, units):
    msg = refuse(resnext, [GrowStep("wide", "layer3.0.conv1", units)])
    assert f"cannot grow 'layer3.0.conv1' by {units} units" in msg and "grouped conv layer3.0.conv2" in msg
    assert "use --units 16, 32, 48 or another multiple of 16" in msg


def test_depthwise_conv_names_the_expansion_conv_that_feeds_it(mobilenet):
    # features.4.block.1.0 (depthwise) is fed by features.4.block.0.0 (1x1 expand conv), which grows
    msg = refuse(mobilenet, [GrowStep("wide", "features.4.block.1.0", 8)])
    assert "'features.4.block.1.0' is a depthwise conv" in msg and "widen 'features.4.block.0.0' instead" in msg


def test_head_itself(resnet18):
    msg = refuse(resnet18, [HeadStep(classes=7), GrowStep("wide", "fc", 8)])
    assert "'fc'" in msg and "growable layers" in msg
    assert "fc" not in _suggested(msg)
    msg = refuse(resnet18, [GrowStep("wide", "fc", 8)])  # without replacing it first
    assert "'fc'" in msg and "growable layers" in msg


def test_not_a_linear_or_conv(resnet18):
    msg = refuse(resnet18, [GrowStep("wide", "layer4.1.bn1", 8)])
    assert "BatchNorm2d" in msg and "not a Linear or Conv2d" in msg and "growable layers" in msg


def test_module_not_called_in_forward():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.spare, self.fc2 = nn.Linear(12, 8), nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x.mean((2, 3)).repeat(1, 4))))

    msg = refuse(Unused(), [GrowStep("wide", "spare", 4)], size=8)
    assert "not used by the model's forward" in msg and "growable layers: fc1" in msg


def test_widen_same_layer_twice():
    msg = refuse(digitnet(), [HeadStep(classes=7), GrowStep("wide", "classifier.3", 8), GrowStep("wide", "classifier.3", 8)], 32)
    assert "already widened" in msg and "total number of units" in msg


def test_widen_twice_without_norm():
    """The second widen is refused also when the first one was norm=False (no GrowNorm marks it)."""
    msg = refuse(digitnet(), [GrowStep("wide", "classifier.3", 8, norm=False), GrowStep("wide", "classifier.3", 8)], 32)
    assert "already widened" in msg


def test_untraceable_model():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 4)

        def forward(self, x):
            x = x.mean((2, 3))
            if x.sum() > 0:
                x = x * 2
            return self.fc(x)

    with pytest.raises(GrowthError) as info:
        trace(Branchy())
    msg = str(info.value)
    assert "\n" not in msg and "Branchy cannot be traced" in msg and "data-dependent control flow" in msg


def test_untraceable_model_is_a_surgeon_error_for_the_cli():
    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(SurgeonError):
        trace(Branchy())


class TwoBranches(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1)
        self.c = nn.Conv2d(16, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1)
        y = F.relu(self.c(y))
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


class ConcatIntoResidual(TwoBranches):
    def __init__(self):
        super().__init__()
        self.c, self.fc = nn.Conv2d(16, 16, 3, padding=1), nn.Linear(16, 5)

    def forward(self, x):
        y = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1)
        y = F.relu(self.c(y)) + y
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


def test_output_into_concat_is_followed_to_what_reads_the_concat():
    """A concat is followed through (tests/grow/test_concat_growth.py); what reads it decides."""
    msg = refuse(ConcatIntoResidual(), [HeadStep(classes=3), GrowStep("wide", "a", 4)], size=16)
    assert "cannot grow 'a'" in msg and "residual add" in msg
    msg = refuse(TwoBranches(), [HeadStep(classes=3), GrowStep("deep", "b", 4)], size=16)
    assert "would change the input width of the pretrained c from 8" in msg


def test_output_into_a_product_with_another_branch():
    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.f, self.g, self.fc = nn.Linear(3, 6), nn.Linear(3, 6), nn.Linear(6, 2)

        def forward(self, x):
            x = x.mean((2, 3))
            return self.fc(torch.relu(self.f(x)) * torch.sigmoid(self.g(x)))

    msg = refuse(Gate(), [GrowStep("wide", "f", 4)], size=8)
    assert "a product with another tensor" in msg


def test_deep_zero_init():
    msg = refuse(digitnet(), [HeadStep(classes=7), GrowStep("deep", "classifier.3", 64, init="zero")], 32)
    assert "zero" in msg and "random or net2net" in msg


def test_deep_width_change_before_pretrained_consumer(resnet18):
    msg = refuse(digitnet(), [HeadStep(classes=7), GrowStep("deep", "classifier.0", 64)], 32)
    assert "classifier.3" in msg and "--units 128" in msg
    msg = refuse(resnet18, [HeadStep(classes=7), GrowStep("deep", "layer4.1.conv1", 64)])
    assert "layer4.1.conv2" in msg and "--units 512" in msg


def test_deep_net2net_needs_same_width():
    msg = refuse(digitnet(), [HeadStep(classes=7), GrowStep("deep", "classifier.3", 64, init="net2net")], 32)
    assert "identity" in msg and "--units 128" in msg


def test_refusal_leaves_graph_runnable():
    """A refused step raises before editing: the model still runs with its old structure."""
    model = digitnet()
    gm = trace(model)
    apply_steps(gm, [HeadStep(classes=7)], GrowthState(input_size=32))
    before = {k: v.shape for k, v in gm.state_dict().items()}
    for bad in (GrowStep("deep", "classifier.0", 64), GrowStep("wide", "classifier.6", 4),
                GrowStep("deep", "classifier.3", 8, init="zero")):
        with pytest.raises(GrowthError):
            apply_steps(gm, [bad], GrowthState(input_size=32))
    assert {k: v.shape for k, v in gm.state_dict().items()} == before
    gm.eval()
    with torch.no_grad():
        assert gm(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_model_that_does_not_run_at_input_size():
    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3 * 8 * 8, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(torch.relu(self.fc(x.flatten(1))))

    gm = trace(Fixed())
    with pytest.raises(GrowthError, match="does not run on a 3x16x16 image"):
        apply_steps(gm, [GrowStep("wide", "fc", 4)], GrowthState(input_size=16))


def test_refusal_names_a_function_by_its_name():
    """A torch function the chain cannot pass is named plainly, not by its repr."""

    class ChannelsLast(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            return self.fc(torch.permute(self.conv(x), (0, 2, 3, 1))).mean((1, 2))

    msg = refuse(ChannelsLast(), [GrowStep("wide", "conv", 4)], size=16)
    assert "(permute), which surgeon cannot widen through" in msg and "<built-in" not in msg
