"""Wide and deep growth on torchvision models and DigitNet: shapes, structure, and that the
pretrained units' activations are untouched."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import fx, nn

from surgeon.grow.analysis import find_site, propagate_shapes, trace
from surgeon.grow.modules import ExtendedConv2d, ExtendedLinear, SplitBatchNorm, Widened, in_channels, out_channels
from surgeon.grow.ops import GrowthState, apply_steps
from surgeon.grow.recipe import GrowStep, HeadStep

from tests.grow.helpers import Capture, digitnet, grownorm_nodes, images, randomize_batchnorms, torchvision_model

SIZE = 64
ACTIVATIONS = (nn.ReLU, nn.Hardswish)


@functools.lru_cache(maxsize=None)
def _pristine(name: str) -> nn.Module:
    return randomize_batchnorms(torchvision_model(name))


@pytest.fixture(scope="module", autouse=True)
def _drop_cached_models():
    yield
    _pristine.cache_clear()  # alexnet + vgg11 hold ~800 MB


def fresh(name: str) -> nn.Module:
    """A copy of a cached, randomly initialised torchvision model (building alexnet/vgg is slow)."""
    return copy.deepcopy(_pristine(name)).eval()


# (model, layer, its channel count, the consumer that reads it, whether that consumer is pretrained)
WIDE_CASES = [
    pytest.param("alexnet", "classifier.4", 4096, "classifier.6", False, id="alexnet-fc7"),
    pytest.param("vgg11", "classifier.3", 4096, "classifier.6", False, id="vgg11-fc7", marks=pytest.mark.slow),  # ~4 s
    pytest.param("resnet18", "layer4.1.conv1", 512, "layer4.1.conv2", True, id="resnet18"),
    pytest.param("resnet50", "layer4.1.conv1", 512, "layer4.1.conv2", True, id="resnet50"),
    pytest.param("mobilenet_v3_small", "classifier.0", 1024, "classifier.3", False, id="mnv3-classifier.0"),
    pytest.param("mobilenet_v3_small", "features.12.0", 576, "classifier.0", True, id="mnv3-features.12.0"),
]


def _node(gm: fx.GraphModule, target: str) -> fx.Node:
    (node,) = [n for n in gm.graph.nodes if n.op == "call_module" and str(n.target) == target]
    return node


def _is_activation(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), ACTIVATIONS)
    return node.op == "call_function" and node.target in (torch.relu, torch.nn.functional.relu)


@pytest.mark.parametrize("name, layer, channels, consumer, consumer_pretrained", WIDE_CASES)
def test_wide_growth(name, layer, channels, consumer, consumer_pretrained):
    k = 8
    model = fresh(name)
    x = images(2, SIZE)
    old_layer = model.get_submodule(layer)
    old_consumer_weight = model.get_submodule(consumer).weight.detach().clone()
    cap_orig = Capture(old_layer)
    with torch.no_grad():
        y_orig = model(x)
    cap_orig.remove()
    assert cap_orig.value.shape[1] == channels

    gm = trace(model)  # shares the leaf modules with ``model``
    state = apply_steps(gm, [HeadStep(classes=7), GrowStep("wide", layer, k)], GrowthState(input_size=SIZE))
    gm.eval()

    widened = gm.get_submodule(layer)
    assert isinstance(widened, Widened) and widened.old is old_layer
    assert out_channels(widened) == channels + k and out_channels(widened.new) == k
    assert in_channels(widened.new) == in_channels(old_layer)

    cap_new = Capture(widened)
    with torch.no_grad():
        y = gm(x)
    cap_new.remove()
    assert y.shape == (2, 7)
    assert torch.isfinite(y).all()
    # The old units' pre-normalization activations are exactly what the original layer computed.
    assert cap_new.value.shape[1] == channels + k
    torch.testing.assert_close(cap_new.value[:, :channels], cap_orig.value, rtol=0, atol=0)

    # The consumer reads C + k channels (× positions for a flatten); pretrained columns are kept.
    cons = gm.get_submodule(consumer)
    site_positions = cons.weight.shape[1] // channels if consumer_pretrained else 1
    if consumer_pretrained:
        assert isinstance(cons, (ExtendedLinear, ExtendedConv2d))
        torch.testing.assert_close(cons.weight, old_consumer_weight, rtol=0, atol=0)
        assert cons.weight_extra.shape[1] == k * site_positions
        assert in_channels(cons) == (channels + k) * site_positions
    else:
        assert state.head == consumer
        assert type(cons) in (nn.Linear, nn.Conv2d) and in_channels(cons) == channels + k
        assert out_channels(cons) == 7

    # BatchNorms in the chain got k new channels and kept the pretrained ones.
    for bn in (m for m in gm.modules() if isinstance(m, SplitBatchNorm)):
        assert bn.new.num_features == k and bn.num_features == channels + k

    # One GrowNorm with groups (C, k), right after the activation that follows the layer.
    (norm_node,) = grownorm_nodes(gm)
    norm = gm.get_submodule(str(norm_node.target))
    assert norm.groups == (channels, k) and norm.role == "wide"
    assert state.norms == [str(norm_node.target)] and state.grown == [layer]
    act = norm_node.args[0]
    assert _is_activation(gm, act)
    back = act.args[0]
    while back.op == "call_module" and isinstance(gm.get_submodule(str(back.target)), SplitBatchNorm):
        back = back.args[0]
    assert back is _node(gm, layer)

    # Growing a traced copy leaves the original model as it was.
    with torch.no_grad():
        torch.testing.assert_close(model(x), y_orig, rtol=0, atol=0)


# (model, layer, units, layer feeding the head?)
DEEP_CASES = [
    pytest.param("alexnet", "classifier.4", 64, True, id="alexnet-fc7"),
    pytest.param("mobilenet_v3_small", "classifier.0", 32, True, id="mnv3-classifier.0"),
    pytest.param("resnet18", "layer4.1.conv1", 512, False, id="resnet18"),
]


@pytest.mark.parametrize("name, layer, units, feeds_head", DEEP_CASES)
def test_deep_growth(name, layer, units, feeds_head):
    model = fresh(name)
    gm = trace(model)
    state = apply_steps(gm, [HeadStep(classes=7), GrowStep("deep", layer, units)], GrowthState(input_size=SIZE))
    gm.eval()
    x = images(2, SIZE)
    with torch.no_grad():
        y = gm(x)
    assert y.shape == (2, 7) and torch.isfinite(y).all()

    (norm_node,) = grownorm_nodes(gm)
    norm = gm.get_submodule(str(norm_node.target))
    assert norm.groups == (units,) and norm.role == "deep"
    block_node = norm_node.args[0]
    block = gm.get_submodule(str(block_node.target))
    assert isinstance(block, nn.Sequential) and str(block_node.target) in state.fresh
    assert out_channels(block[0]) == units
    # The block reads the activations after the layer (through its chain)...
    src, hops = block_node.args[0], 0
    while not (src.op == "call_module" and str(src.target) == layer):
        assert src.all_input_nodes and hops < 5, "the deep block does not read the layer's chain"
        src, hops = src.all_input_nodes[0], hops + 1
    # ... and the grown layer itself is untouched (deep growth adds no units to it).
    assert not isinstance(gm.get_submodule(layer), Widened)
    if not feeds_head:  # units == C: the pretrained consumer is kept as it was
        cons = gm.get_submodule(layer.rsplit(".", 1)[0] + ".conv2")
        assert type(cons) is nn.Conv2d and cons.weight is model.get_submodule(layer.rsplit(".", 1)[0] + ".conv2").weight
    if feeds_head:
        assert in_channels(gm.get_submodule(state.head)) == units
        assert _node(gm, state.head).args[0] is norm_node


def _digit_steps_ok(steps, n_norms):
    torch.manual_seed(0)
    gm = trace(randomize_batchnorms(digitnet()))
    state = apply_steps(gm, steps, GrowthState(input_size=32))
    x = images(4, 32)
    gm.eval()
    with torch.no_grad():
        y = gm(x)
    assert y.shape == (4, 7) and torch.isfinite(y).all()
    # training mode (BatchNorm batch statistics, dropout) and a backward pass reach every new unit
    gm.train()
    loss = gm(x).logsumexp(1).mean()
    loss.backward()
    for p in gm.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()
    assert len(grownorm_nodes(gm)) == n_norms == len(state.norms)
    return gm, state


def test_wwa_digitnet():
    gm, state = _digit_steps_ok(
        [HeadStep(classes=7), GrowStep("wide", "classifier.0", 24), GrowStep("wide", "classifier.3", 16)], 2)
    fc6, fc7 = gm.get_submodule("classifier.0"), gm.get_submodule("classifier.3")
    assert isinstance(fc6, Widened) and isinstance(fc7, Widened)
    assert out_channels(fc6) == 128 + 24 and out_channels(fc7) == 128 + 16
    # fc7's old and new units both read fc6's 128 + 24 outputs; its pretrained columns stay separate
    assert isinstance(fc7.old, ExtendedLinear) and fc7.old.weight.shape == (128, 128)
    assert in_channels(fc7) == 152 and fc7.new.in_features == 152
    assert in_channels(gm.get_submodule("classifier.6")) == 144
    groups = sorted(gm.get_submodule(n).groups for n in state.norms)
    assert groups == [(128, 16), (128, 24)]
    assert state.grown == ["classifier.0", "classifier.3"]


@pytest.mark.parametrize("order", ["deep-then-wide", "wide-then-deep"])
def test_dwa_digitnet(order):
    deep, wide = GrowStep("deep", "classifier.3", 48), GrowStep("wide", "classifier.3", 16)
    steps = [HeadStep(classes=7)] + ([deep, wide] if order == "deep-then-wide" else [wide, deep])
    gm, state = _digit_steps_ok(steps, 2)
    block_name = next(n for n in state.fresh if n != state.head)
    block = gm.get_submodule(block_name)
    assert type(block[0]) is nn.Linear  # a fresh block stays one plain tensor
    assert block[0].in_features == 128 + 16 and block[0].out_features == 48
    assert in_channels(gm.get_submodule("classifier.6")) == 48
    roles = sorted((gm.get_submodule(n).role, gm.get_submodule(n).groups) for n in state.norms)
    assert roles == [("deep", (48,)), ("wide", (128, 16))]


def test_widen_conv_digitnet_with_flatten_positions():
    gm, _ = _digit_steps_ok([HeadStep(classes=7), GrowStep("wide", "features.8", 8)], 1)
    fc6 = gm.get_submodule("classifier.0")
    assert isinstance(fc6, ExtendedLinear)
    assert fc6.weight.shape == (128, 64 * 16) and fc6.weight_extra.shape == (128, 8 * 16)
    assert isinstance(gm.get_submodule("features.9"), SplitBatchNorm)


def test_deep_conv_digitnet_keeps_width():
    gm, state = _digit_steps_ok([HeadStep(classes=7), GrowStep("deep", "features.8", 64)], 1)
    block = gm.get_submodule(next(n for n in state.fresh if n != state.head))
    assert isinstance(block[0], nn.Conv2d) and block[0].in_channels == block[0].out_channels == 64
    # the pretrained fc6 is untouched
    assert type(gm.get_submodule("classifier.0")) is nn.Linear


def test_recipe_replay_is_deterministic_in_structure():
    steps = [HeadStep(classes=7), GrowStep("wide", "classifier.0", 24), GrowStep("deep", "classifier.3", 32)]
    a, _ = _digit_steps_ok(steps, 2)
    b, _ = _digit_steps_ok(steps, 2)
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}


def test_find_site_reports_consumers_and_positions():
    gm = trace(digitnet())
    propagate_shapes(gm, 32)
    site = find_site(gm, "features.8")
    assert site.channels == 64 and site.rank == 4
    assert [(c.name, c.positions) for c in site.consumers] == [("classifier.0", 16)]
    assert site.batchnorms == ["features.9"]
    site = find_site(gm, "classifier.0")
    assert [(c.name, c.positions) for c in site.consumers] == [("classifier.3", 1)]


def test_growth_keeps_model_dtype():
    model = digitnet().double()
    gm = trace(model)
    apply_steps(gm, [HeadStep(classes=7), GrowStep("wide", "features.8", 8), GrowStep("deep", "classifier.3", 32)],
                GrowthState(input_size=32))
    assert {p.dtype for p in gm.parameters()} == {torch.float64}
    with torch.no_grad():
        assert gm.eval()(images(2, 32).double()).dtype == torch.float64


def test_head_found_through_activation_and_pooling():
    """SqueezeNet's head is a 1x1 conv followed by ReLU, pooling and flatten: it is still found and
    replaced, and a fire module's squeeze conv grows."""
    from surgeon.grow.analysis import head_name

    gm = trace(torchvision_model("squeezenet1_0"))
    assert head_name(gm) == "classifier.1"
    apply_steps(gm, [HeadStep(classes=7), GrowStep("wide", "features.3.squeeze", 8)], GrowthState(input_size=96))
    gm.eval()
    with torch.no_grad():
        assert gm(torch.randn(2, 3, 96, 96)).shape == (2, 7)
    assert gm.get_submodule("classifier.1").out_channels == 7
