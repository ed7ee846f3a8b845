"""γ auto calibration: growth keeps the scale of what the consumer reads; new units are not slow."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from surgeon.grow.gamma import calibrate_gamma
from surgeon.grow.grownorm import GrowNorm
from surgeon.grow.recipe import GrowStep, HeadStep
from surgeon.zoo import load_base

from tests.grow.helpers import grow, images


@pytest.fixture(scope="module")
def pretrained() -> nn.Module:
    from tests.conftest import DIGITNET

    return load_base("surgeon:digitnet", str(DIGITNET)).module.eval()


def _io(gm, module_name: str, x: torch.Tensor):
    """Input and output of ``module_name`` in an eval forward of ``x``."""
    seen = {}
    h = gm.get_submodule(module_name).register_forward_hook(
        lambda m, inp, out: seen.update(inp=inp[0].detach().clone(), out=out.detach().clone()))
    gm.eval()
    with torch.no_grad():
        gm(x)
    h.remove()
    return seen["inp"], seen["out"]


def _mean_norm(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t.double(), dim=1).mean())


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.mark.parametrize("layer, units", [("classifier.3", 32), ("classifier.0", 64), ("features.8", 16)])
def test_wide_auto_gamma(pretrained, layer, units):
    torch.manual_seed(0)
    gm, state = grow(pretrained, [HeadStep(classes=7), GrowStep("wide", layer, units)], 32)
    (norm_name,) = state.norms
    norm = gm.get_submodule(norm_name)
    assert norm.gamma_init == "auto" and torch.equal(norm.gamma, torch.ones_like(norm.gamma))
    batch = images(48, 32, seed=1)
    gm.train()
    done = calibrate_gamma(gm, batch)
    assert gm.training, "calibration must restore the training mode"
    assert set(done) == {norm_name}

    c = norm.groups[0]
    x, y = _io(gm, norm_name, batch)
    old_in, old_out, new_out = x[:, :c], y[:, :c], y[:, c:]
    # Old group: the consumer reads activations of the magnitude it was trained on.
    assert _rel(_mean_norm(old_out), _mean_norm(old_in)) < 1e-4
    # New group: each new unit has the RMS magnitude of an old unit.
    assert _rel(_mean_norm(new_out) / math.sqrt(units), _mean_norm(old_out) / math.sqrt(c)) < 1e-4
    # γ is what the returned summary says, and is constant within each group.
    assert done[norm_name] == pytest.approx([float(norm.gamma.detach()[0]), float(norm.gamma.detach()[-1])])
    assert torch.all(norm.gamma[:c] == norm.gamma[0]) and torch.all(norm.gamma[c:] == norm.gamma[-1])


def test_deep_auto_gamma(pretrained):
    torch.manual_seed(0)
    k = 48
    gm, state = grow(pretrained, [HeadStep(classes=7), GrowStep("deep", "classifier.3", k)], 32)
    (norm_name,) = state.norms
    block_name = next(n for n in state.fresh if n != state.head)
    batch = images(48, 32, seed=2)
    calibrate_gamma(gm, batch)
    block_in, _ = _io(gm, block_name, batch)
    c = block_in.shape[1]
    norm = gm.get_submodule(norm_name)
    expected = _mean_norm(block_in) * math.sqrt(k / c)
    assert torch.allclose(norm.gamma.double(), torch.full((k,), expected, dtype=torch.float64), rtol=1e-4)
    # so each new unit's RMS equals that of a unit the consumer read before the block was inserted
    _, out = _io(gm, norm_name, batch)
    assert _rel(_mean_norm(out) / math.sqrt(k), _mean_norm(block_in) / math.sqrt(c)) < 1e-4


def test_chained_norms_calibrate_in_graph_order(pretrained):
    """WWA: the fc7 norm is calibrated on what the calibrated fc6 norm produces."""
    torch.manual_seed(0)
    gm, state = grow(pretrained, [HeadStep(classes=7), GrowStep("wide", "classifier.0", 32),
                                  GrowStep("wide", "classifier.3", 32)], 32)
    batch = images(48, 32, seed=3)
    calibrate_gamma(gm, batch)
    for name in state.norms:
        c = gm.get_submodule(name).groups[0]
        x, y = _io(gm, name, batch)
        assert _rel(_mean_norm(y[:, :c]), _mean_norm(x[:, :c])) < 1e-4, name


def test_constant_gamma_is_left_alone(pretrained):
    torch.manual_seed(0)
    steps = [HeadStep(classes=7), GrowStep("wide", "classifier.3", 16, gamma_init=20),
             GrowStep("deep", "classifier.3", 24, gamma_init=20)]
    gm, state = grow(pretrained, steps, 32)
    norms = [gm.get_submodule(n) for n in state.norms]
    assert len(norms) == 2
    for n in norms:
        assert torch.equal(n.gamma.detach(), torch.full_like(n.gamma, 20.0))
    assert calibrate_gamma(gm, images(16, 32), only_auto=True) == {}
    for n in norms:
        assert torch.equal(n.gamma.detach(), torch.full_like(n.gamma, 20.0))
    # positive control: only_auto=False recalibrates them
    done = calibrate_gamma(gm, images(16, 32), only_auto=False)
    assert set(done) == set(state.norms)
    assert not torch.equal(norms[0].gamma.detach(), torch.full_like(norms[0].gamma, 20.0))


def test_no_signal_keeps_gamma_one(pretrained):
    torch.manual_seed(0)
    gm, state = grow(pretrained, [HeadStep(classes=7), GrowStep("wide", "classifier.3", 16)], 32)
    with torch.no_grad():
        gm.get_submodule("classifier.3").old.bias.fill_(-1e4)  # the old units are dead after the ReLU
    with pytest.warns(UserWarning, match="no signal"):
        calibrate_gamma(gm, images(8, 32))
    norm = gm.get_submodule(state.norms[0])
    assert torch.equal(norm.gamma.detach(), torch.ones_like(norm.gamma))


def test_scale_free_norm_is_skipped(pretrained):
    torch.manual_seed(0)
    gm, state = grow(pretrained, [HeadStep(classes=7), GrowStep("wide", "classifier.3", 16)], 32)
    name = state.norms[0]
    gm.set_submodule(name, GrowNorm((128, 16), scale=False))
    assert calibrate_gamma(gm, images(8, 32)) == {}
