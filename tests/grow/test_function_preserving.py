"""net2net and zero init preserve the network's function before normalization (norm=False, head kept)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from surgeon.grow.modules import Widened
from surgeon.grow.recipe import GrowStep
from surgeon.zoo import load_base

from tests.grow.helpers import Capture, grow, images, randomize_batchnorms, torchvision_model


@pytest.fixture(scope="module")
def pretrained_digitnet() -> nn.Module:
    from tests.conftest import DIGITNET

    return load_base("surgeon:digitnet", str(DIGITNET)).module.eval()


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    return randomize_batchnorms(torchvision_model("resnet18"), seed=3)


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).abs().max() / ref.abs().max())


def _outputs(model: nn.Module, steps, size: int, seed: int = 0):
    x = images(4, size, seed=seed)
    with torch.no_grad():
        ref = model(x)
    torch.manual_seed(seed)
    gm, _ = grow(model, steps, size)
    with torch.no_grad():
        y = gm(x)
    assert y.shape == ref.shape
    return y, ref, gm, x


CASES = [
    pytest.param("digitnet", "classifier.3", 16, id="linear"),
    pytest.param("digitnet", "classifier.3", 300, id="linear-more-units-than-channels"),
    pytest.param("digitnet", "features.8", 16, id="conv-bn-flatten-linear"),
    pytest.param("resnet18", "layer4.1.conv1", 32, id="conv-bn-conv"),
]


def _model(which, request):
    return request.getfixturevalue("pretrained_digitnet" if which == "digitnet" else "resnet18")


def _size(which):
    return 32 if which == "digitnet" else 64


@pytest.mark.parametrize("which, layer, units", CASES)
def test_net2net_preserves_function(which, layer, units, request):
    model = _model(which, request)
    y, ref, gm, x = _outputs(model, [GrowStep("wide", layer, units, init="net2net", norm=False)], _size(which))
    assert _rel_err(y, ref) < 1e-5
    # every new unit is a copy of an old one (before the split of the outgoing weights)
    widened = gm.get_submodule(layer)
    assert isinstance(widened, Widened)
    cap = Capture(widened)
    with torch.no_grad():
        gm(x)
    cap.remove()
    rows = cap.value.transpose(0, 1).reshape(cap.value.shape[1], -1)  # one row per channel
    old, new = rows[:-units], rows[-units:]
    dist = torch.cdist(new, old, p=float("inf"))  # [units, C]: max abs difference between channels
    assert float(dist.min(dim=1).values.max()) < 1e-5 * float(rows.abs().max()), "a new unit copies no old unit"


@pytest.mark.parametrize("which, layer, units", CASES)
def test_zero_init_preserves_function(which, layer, units, request):
    model = _model(which, request)
    y, ref, _, _ = _outputs(model, [GrowStep("wide", layer, units, init="zero", norm=False)], _size(which))
    assert _rel_err(y, ref) < 1e-6


@pytest.mark.parametrize("which, layer, units", CASES)
def test_random_init_changes_function(which, layer, units, request):
    model = _model(which, request)
    y, ref, _, _ = _outputs(model, [GrowStep("wide", layer, units, init="random", norm=False)], _size(which))
    assert _rel_err(y, ref) > 1e-3


def test_net2net_wwa_and_deep_identity_preserve_function(pretrained_digitnet):
    steps = [
        GrowStep("wide", "classifier.0", 24, init="net2net", norm=False),
        GrowStep("wide", "classifier.3", 40, init="net2net", norm=False),
        GrowStep("deep", "classifier.3", 168, init="net2net", norm=False),  # 128 + 40: identity block
    ]
    y, ref, _, _ = _outputs(pretrained_digitnet, steps, 32)
    assert _rel_err(y, ref) < 1e-5


def test_net2net_with_norm_changes_scale_only_through_grownorm(pretrained_digitnet):
    """With norm=True the GrowNorm is the only thing between the preserved layer and its consumer:
    removing its effect (feeding the consumer the GrowNorm's input) gives back the original output."""
    x = images(4, 32)
    with torch.no_grad():
        ref = pretrained_digitnet(x)
    gm, state = grow(pretrained_digitnet, [GrowStep("wide", "classifier.3", 16, init="net2net")], 32)
    (norm_name,) = state.norms
    gm.get_submodule(norm_name).register_forward_hook(lambda m, inp, out: inp[0])
    with torch.no_grad():
        assert _rel_err(gm(x), ref) < 1e-5
