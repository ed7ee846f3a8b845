"""Plain user nn.Modules written with functional ops grow wide and deep."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from surgeon.grow.grownorm import GrowNorm
from surgeon.grow.modules import Widened, in_channels, out_channels
from surgeon.grow.recipe import GrowStep, HeadStep

from tests.grow.helpers import grow, grownorm_nodes, images

SIZE = 16


class MLP(nn.Module):
    """Functional ReLUs, no nn.ReLU modules."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3 * SIZE * SIZE, 32)
        self.fc2 = nn.Linear(32, 24)
        self.out = nn.Linear(24, 5)

    def forward(self, x):
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.dropout(F.relu(self.fc2(x)), 0.1, self.training)
        return self.out(x)


class CNN(nn.Module):
    """The classic tutorial CNN: functional ReLU/pooling and ``x.view(x.size(0), -1)``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc1 = nn.Linear(16 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 5)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.view(x.size(0), -1)
        x = F.relu(self.fc1(x))
        return self.fc2(x)


def _run(model, steps, n_norms):
    torch.manual_seed(0)
    gm, state = grow(model, [HeadStep(classes=3), *steps], SIZE)
    x = images(4, SIZE)
    with torch.no_grad():
        y = gm(x)
    assert y.shape == (4, 3) and torch.isfinite(y).all()
    gm.train()
    gm(x).sum().backward()
    assert len(grownorm_nodes(gm)) == n_norms
    return gm, state


def test_mlp_wide():
    gm, state = _run(MLP(), [GrowStep("wide", "fc1", 8), GrowStep("wide", "fc2", 6)], 2)
    assert out_channels(gm.get_submodule("fc1")) == 40 and in_channels(gm.get_submodule("fc2")) == 40
    assert in_channels(gm.get_submodule("out")) == 30
    norms = [gm.get_submodule(str(n.target)) for n in grownorm_nodes(gm)]
    assert sorted(n.groups for n in norms) == [(24, 6), (32, 8)]
    # the GrowNorm sits right after the functional relu
    for n in grownorm_nodes(gm):
        assert n.args[0].op == "call_function" and n.args[0].target in (F.relu, torch.relu)


def test_mlp_deep():
    gm, state = _run(MLP(), [GrowStep("deep", "fc2", 12)], 1)
    assert in_channels(gm.get_submodule("out")) == 12


def test_mlp_wide_then_deep_then_reuse_grown_graph():
    gm, state = _run(MLP(), [GrowStep("wide", "fc2", 6), GrowStep("deep", "fc2", 10), GrowStep("wide", "fc1", 4)], 3)
    assert isinstance(gm.get_submodule("fc1"), Widened) and isinstance(gm.get_submodule("fc2"), Widened)


def test_cnn_wide_first_conv_and_deep_fc():
    gm, _ = _run(CNN(), [GrowStep("wide", "conv1", 4), GrowStep("deep", "fc1", 16)], 2)
    assert gm.get_submodule("conv2").in_channels == 12


def test_cnn_wide_fc():
    gm, _ = _run(CNN(), [GrowStep("wide", "fc1", 4)], 1)
    assert in_channels(gm.get_submodule("fc2")) == 36


def test_cnn_wide_conv_before_view():
    gm, _ = _run(CNN(), [GrowStep("wide", "conv2", 4)], 1)
    assert in_channels(gm.get_submodule("fc1")) == 20 * 16


def test_cnn_deep_conv_before_view():
    _run(CNN(), [GrowStep("deep", "conv2", 16)], 1)


def test_user_grownorm_module_is_kept_and_treated_as_norm():
    """A model that already contains a GrowNorm (e.g. one grown before) is traced with it as a leaf."""

    class Pre(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(3, 6)
            self.n = GrowNorm((6,), gamma_init=2.0)
            self.head = nn.Linear(6, 2)

        def forward(self, x):
            return self.head(self.n(F.relu(self.fc1(x.mean((2, 3))))))

    gm, _ = grow(Pre(), [GrowStep("deep", "fc1", 6)], SIZE)
    with torch.no_grad():
        assert gm(images(2, SIZE)).shape == (2, 2)


class FixedViewCNN(CNN):
    """``x.view(-1, 16 * 4 * 4)``: a hard-coded width that growth would break."""

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.view(-1, 16 * 4 * 4)
        return self.fc2(F.relu(self.fc1(x)))


def test_fixed_view_other_layers_still_grow():
    _run(FixedViewCNN(), [GrowStep("wide", "conv1", 4), GrowStep("wide", "fc1", 4)], 2)


def test_fixed_view_is_refused_before_editing():
    from surgeon.errors import GrowthError
    from surgeon.grow.analysis import trace
    from surgeon.grow.ops import GrowthState, apply_steps

    gm = trace(FixedViewCNN())
    apply_steps(gm, [HeadStep(classes=3)], GrowthState(input_size=SIZE))
    before = {k: v.shape for k, v in gm.state_dict().items()}
    with pytest.raises(GrowthError) as info:
        apply_steps(gm, [GrowStep("wide", "conv2", 4)], GrowthState(input_size=SIZE))
    msg = str(info.value)
    assert "--input-size" not in msg and ("view" in msg or "reshape" in msg) and "growable layers" in msg
    assert {k: v.shape for k, v in gm.state_dict().items()} == before


class _SkipBlock(nn.Module):
    """A residual block with stochastic depth (as in EfficientNet/ConvNeXt), plus a parameterless
    module of the user's that reads self.training."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.ops import StochasticDepth

        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.drop = StochasticDepth(0.5, "row")

    def forward(self, x):
        return x + self.drop(self.conv(x))


class _Noise(nn.Module):
    def forward(self, x):
        return x + torch.randn_like(x) if self.training else x


class _StochasticNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = _SkipBlock()
        self.noise = _Noise()
        self.mid = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.mid(self.noise(self.block(F.relu(self.stem(x))))))
        x = F.dropout(x.mean((2, 3)), 0.5, self.training)  # frozen by tracing: in eval mode, as inference
        return self.fc(x)


def test_training_dependent_modules_follow_eval_after_tracing():
    """fx would freeze ``self.training`` at trace time; a model traced (and grown) in training mode
    must still be deterministic in eval mode and keep stochastic depth in training mode."""
    from torchvision.ops import StochasticDepth

    from surgeon.grow.analysis import trace

    torch.manual_seed(0)
    model = _StochasticNet().train()
    gm = trace(model)
    assert gm.training and model.training  # the mode is restored
    leaves = {type(gm.get_submodule(n.target)) for n in gm.graph.nodes if n.op == "call_module"}
    assert StochasticDepth in leaves and _Noise in leaves
    x = images(4, 16)
    gm.eval()
    with torch.no_grad():
        assert torch.equal(gm(x), gm(x))
        model.eval()
        torch.testing.assert_close(gm(x), model(x))
    gm.train()
    with torch.no_grad():
        assert not torch.equal(gm.block.drop(torch.ones(64, 8, 2, 2)), torch.ones(64, 8, 2, 2))  # still drops rows
    grown, _ = grow(_StochasticNet().train(), [HeadStep(3), GrowStep("wide", "mid", 4)], 16)
    with torch.no_grad():
        assert torch.equal(grown(x), grown(x))
