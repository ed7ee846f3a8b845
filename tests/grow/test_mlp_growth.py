"""Widening the first Linear of a transformer / ConvNeXt MLP: units on the last dim (GrowNorm axis -1).

Reduced-size torchvision ViT, Swin and ConvNeXt instances (the factories below double as
``tests.grow.test_mlp_growth:make_*`` model specs for checkpoints) are grown at an MLP site with
each init and checked at every stage: function preservation before normalization (net2net, zero),
γ calibration over the last dim, one fine-tuning step, checkpoint rebuild, ONNX export verified
against PyTorch with γ folded, and a TensorRT-RTX build.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.convnext import CNBlockConfig, ConvNeXt

from surgeon.errors import GrowthError
from surgeon.grow.analysis import find_site, propagate_shapes, trace
from surgeon.grow.gamma import calibrate_gamma
from surgeon.grow.grownorm import GrowNorm
from surgeon.grow.modules import ExtendedLinear, Widened, in_channels, out_channels
from surgeon.grow.ops import GrowthState, apply_steps
from surgeon.grow.recipe import GrowStep, HeadStep

from tests.grow.helpers import Capture, grow, grown_checkpoint, images

SIZE = 32
UNITS = 12


def _seeded(build):
    torch.manual_seed(0)
    return build().eval()


def make_vit() -> nn.Module:
    model = torchvision.models.VisionTransformer(image_size=SIZE, patch_size=8, num_layers=2, num_heads=2,
                                                 hidden_dim=32, mlp_dim=64, num_classes=10)
    nn.init.normal_(model.heads.head.weight, std=0.1)  # torchvision starts the head at 0: outputs would be constant
    return model


def make_swin() -> nn.Module:
    return torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                                              window_size=[2, 2], num_classes=10)


def make_swin_v2() -> nn.Module:
    from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformerBlockV2

    return torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                                              window_size=[2, 2], num_classes=10, block=SwinTransformerBlockV2,
                                              downsample_layer=PatchMergingV2)


def make_maxvit() -> nn.Module:
    return torchvision.models.MaxVit(input_size=(SIZE, SIZE), stem_channels=8, partition_size=2, block_channels=[16, 32],
                                     block_layers=[1, 1], head_dim=8, stochastic_depth_prob=0.0, num_classes=10)


def make_convnext() -> nn.Module:
    # layer_scale 0.5, not 1e-6: a pretrained-like block whose MLP visibly contributes to the output
    return ConvNeXt(block_setting=[CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], layer_scale=0.5,
                    num_classes=10)


# family -> (factory, MLP first Linear, its width, the Linear reading it)
FAMILIES = {
    "vit": (make_vit, "encoder.layers.encoder_layer_1.mlp.0", 64, "encoder.layers.encoder_layer_1.mlp.3"),
    "swin": (make_swin, "features.3.0.mlp.0", 128, "features.3.0.mlp.3"),
    "convnext": (make_convnext, "features.3.0.block.3", 128, "features.3.0.block.5"),
    "swin_v2": (make_swin_v2, "features.3.0.mlp.0", 128, "features.3.0.mlp.3"),
    "maxvit": (make_maxvit, "blocks.1.layers.0.layers.grid_attention.mlp_layer.1", 128,
               "blocks.1.layers.0.layers.grid_attention.mlp_layer.3"),
}
INITS = ["random", "net2net", "zero"]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    build, layer, width, consumer = FAMILIES[request.param]
    return request.param, _seeded(build), layer, width, consumer


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).abs().max() / ref.abs().max())


# --- structure and function preservation -------------------------------------------------------

@pytest.mark.parametrize("init", INITS)
def test_widen_mlp_structure(family, init):
    _, model, layer, width, consumer = family
    torch.manual_seed(1)
    gm, state = grow(model, [HeadStep(classes=3), GrowStep("wide", layer, UNITS, init=init)], SIZE)
    widened = gm.get_submodule(layer)
    assert isinstance(widened, Widened) and widened.dim == -1 and out_channels(widened) == width + UNITS
    reader = gm.get_submodule(consumer)
    assert isinstance(reader, ExtendedLinear) and in_channels(reader) == width + UNITS
    (norm_name,) = state.norms
    norm = gm.get_submodule(norm_name)
    assert norm.groups == (width, UNITS) and norm.axis == -1
    norm_node = next(n for n in gm.graph.nodes if n.op == "call_module" and str(n.target) == norm_name)
    assert isinstance(gm.get_submodule(str(norm_node.args[0].target)), nn.GELU)  # right after the activation
    x = images(2, SIZE)
    with torch.no_grad():
        y = gm(x)
    assert y.shape == (2, 3) and torch.isfinite(y).all()


@pytest.mark.parametrize("init, tol", [("net2net", 1e-5), ("zero", 1e-6)])
def test_net2net_and_zero_preserve_function(family, init, tol):
    _, model, layer, width, _ = family
    x = images(4, SIZE)
    with torch.no_grad():
        ref = model(x)
    torch.manual_seed(1)
    gm, _ = grow(model, [GrowStep("wide", layer, UNITS, init=init, norm=False)], SIZE)
    with torch.no_grad():
        assert _rel_err(gm(x), ref) < tol
    if init == "net2net":  # every new unit (last dim) copies an old one
        cap = Capture(gm.get_submodule(layer))
        with torch.no_grad():
            gm(x)
        cap.remove()
        rows = cap.value.reshape(-1, width + UNITS).T  # one row per unit
        dist = torch.cdist(rows[width:], rows[:width], p=float("inf"))
        assert float(dist.min(dim=1).values.max()) < 1e-5 * float(rows.abs().max())


def test_random_init_changes_function(family):
    _, model, layer, _, _ = family
    x = images(4, SIZE)
    with torch.no_grad():
        ref = model(x)
    gm, _ = grow(model, [GrowStep("wide", layer, UNITS, init="random", norm=False)], SIZE)
    with torch.no_grad():
        assert _rel_err(gm(x), ref) > 1e-3


def test_net2net_with_norm_changes_scale_only_through_grownorm(family):
    """Feeding the consumer the GrowNorm's input instead of its output gives the original function."""
    _, model, layer, _, _ = family
    x = images(4, SIZE)
    with torch.no_grad():
        ref = model(x)
    torch.manual_seed(1)
    gm, state = grow(model, [GrowStep("wide", layer, UNITS, init="net2net")], SIZE)
    with torch.no_grad():
        assert _rel_err(gm(x), ref) > 1e-3  # the normalization does change it
    gm.get_submodule(state.norms[0]).register_forward_hook(lambda m, inp, out: inp[0])
    with torch.no_grad():
        assert _rel_err(gm(x), ref) < 1e-5


# --- γ calibration over the last dim ------------------------------------------------------------

def test_gamma_auto_calibrates_over_last_dim(family):
    _, model, layer, width, _ = family
    torch.manual_seed(1)
    gm, state = grow(model, [HeadStep(classes=3), GrowStep("wide", layer, UNITS, init="net2net")], SIZE)
    norm = gm.get_submodule(state.norms[0])
    cap = Capture(gm.get_submodule(str(next(n for n in gm.graph.nodes if str(n.target) == state.norms[0]).args[0].target)))
    x = images(8, SIZE, seed=2)
    done = calibrate_gamma(gm, x)
    cap.remove()
    act = cap.value.double()  # GrowNorm input [N, ..., C]
    assert act.shape[-1] == width + UNITS and act.dim() >= 3
    expect_old = float(torch.linalg.vector_norm(act[..., :width], dim=-1).mean())
    expect_new = expect_old * math.sqrt(UNITS / width)
    assert done[state.norms[0]] == pytest.approx([expect_old, expect_new], rel=1e-5)
    assert torch.allclose(norm.gamma[:width].double(), torch.full((width,), expect_old, dtype=torch.float64), rtol=1e-5)
    # the consumer first sees old activations of their usual magnitude: mean norm of the old group kept
    out = Capture(norm)
    with torch.no_grad():
        gm(x)
    out.remove()
    kept = float(torch.linalg.vector_norm(out.value[..., :width].double(), dim=-1).mean())
    assert kept == pytest.approx(expect_old, rel=1e-5)


# --- one fine-tuning step -----------------------------------------------------------------------

def test_one_finetuning_step_trains_new_units(family):
    from surgeon.train.params import apply_freeze, split_parameters

    _, model, layer, _, consumer = family
    torch.manual_seed(1)
    gm, state = grow(model, [HeadStep(classes=3), GrowStep("wide", layer, UNITS)], SIZE)
    calibrate_gamma(gm, images(8, SIZE, seed=2))
    split = split_parameters(gm, state, "top")
    assert {f"{layer}.new.weight", f"{layer}.new.bias", f"{state.norms[0]}.gamma", f"{consumer}.weight_extra"} <= set(split.new)
    assert f"{layer}.old.weight" in split.pretrained and f"{consumer}.weight" in split.pretrained
    assert f"{state.norms[0]}.gamma" in split.no_decay
    first = next(n for n, _ in gm.named_parameters() if n.startswith(("conv_proj", "features.0", "stem")))
    assert first in split.frozen  # --tune top: below the grown layer stays frozen
    apply_freeze(gm, split)
    opt = torch.optim.SGD([{"params": list(split.pretrained.values())},
                           {"params": list(split.new.values()), "lr": 0.1}], lr=0.01, momentum=0.9)
    gm.train()
    x, y = images(6, SIZE, seed=3), torch.tensor([0, 1, 2, 0, 1, 2])
    loss = F.cross_entropy(gm(x), y)
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in split.new.items():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in split.frozen.values())
    before = gm.get_submodule(layer).new.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, gm.get_submodule(layer).new.weight)
    gm.eval()
    with torch.no_grad():
        assert torch.isfinite(gm(x)).all()


# --- checkpoint, export, TensorRT-RTX -------------------------------------------------------------

def _checkpoint(tmp_path, name: str, init: str = "random"):
    build, layer, _, _ = FAMILIES[name]
    return grown_checkpoint(tmp_path / "grown.pt", _seeded(build), layer, UNITS, init,
                            f"tests.grow.test_mlp_growth:make_{name}", SIZE)


REBUILDS = [("vit", "net2net"), ("vit", "zero")] + [(name, "random") for name in FAMILIES]


@pytest.mark.parametrize("name, init", REBUILDS)
def test_checkpoint_rebuild_gives_identical_outputs(tmp_path, name, init):
    from surgeon.checkpoint import load_model

    path, gm = _checkpoint(tmp_path, name, init)
    rebuilt = load_model(path, trust_code=True).eval()
    layer = FAMILIES[name][1]
    assert rebuilt.get_submodule(layer).dim == -1
    assert [m.axis for m in rebuilt.modules() if isinstance(m, GrowNorm)] == [-1]
    x = images(3, SIZE, seed=4)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), gm(x))


@pytest.fixture(scope="module", params=list(FAMILIES))
def exported(request, tmp_path_factory):
    from surgeon.export.onnx_export import export_checkpoint

    d = tmp_path_factory.mktemp(f"mlp-{request.param}")
    path, _ = _checkpoint(d, request.param)
    return request.param, export_checkpoint(path, d / "model.onnx", trust_code=True)


def test_export_verifies_and_folds_gamma(exported):
    import onnx
    import onnx.numpy_helper

    name, result = exported
    assert result.verifications and all(v.ok for v in result.verifications)
    assert max(v.rel_err for v in result.verifications) <= 1e-4
    _, _, width, _ = FAMILIES[name]
    fold = next(p for p in result.passes if p["pass"] == "fold-gamma")
    (change,) = fold["changed"]  # every γ folded into the second Linear's weight rows
    assert f"γ of {width + UNITS}/{width + UNITS} channels folded into MatMul" in change["done"], fold
    graph = onnx.load(result.path).graph
    norms = [n for n in graph.node if n.op_type == "GrowNorm"]
    assert len(norms) == 1 and any(a.name == "axis" and a.i == -1 for a in norms[0].attribute)
    consts = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    consts.update({n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t) for n in graph.node if n.op_type == "Constant"})
    gamma = [consts[i] for i in norms[0].input[1:] if i]
    assert all((g == 1).all() for g in gamma), f"{name}: γ left on the GrowNorm node"


def test_exported_mlp_growth_builds_with_tensorrt_rtx(exported):  # < 1 s each: not marked slow
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu12 is not installed")
    from surgeon.trt.build import build_engine

    name, result = exported
    # MaxViT's attention writes Einsum equations with capitals, which TensorRT's parser refuses: the
    # builder hands it a copy with lowercase labels (surgeon/trt/einsum.py)
    report = build_engine(result.path, builder="tensorrt-rtx")
    assert report.engine_bytes > 10_000 and report.grownorm_nodes == 1
    assert report.grownorm_impl == "onnx function" and report.plugin_layers == 0


# --- deep growth at an MLP site -----------------------------------------------------------------

def test_deep_after_mlp_linear(family):
    _, model, layer, width, _ = family
    gm, state = grow(model, [HeadStep(classes=3), GrowStep("deep", layer, width)], SIZE)
    (norm_name,) = state.norms
    assert gm.get_submodule(norm_name).axis == -1 and gm.get_submodule(norm_name).groups == (width,)
    block = gm.get_submodule(layer.replace(".", "_") + "_deep")
    seen: list[torch.Tensor] = []
    handle = block.register_forward_hook(lambda m, inp, out: seen.append(inp[0].detach().double()))
    done = calibrate_gamma(gm, images(4, SIZE))
    handle.remove()
    (block_input,) = seen  # [N, ..., C]: γ restores its mean norm over the last dim (k == C)
    assert done[norm_name][0] == pytest.approx(float(torch.linalg.vector_norm(block_input, dim=-1).mean()), rel=1e-5)
    gm.train()
    gm(images(2, SIZE)).sum().backward()
    assert all(p.grad is not None for n, p in gm.named_parameters() if n.startswith(layer.replace(".", "_") + "_deep"))


def test_deep_refusals_after_gelu(family):
    _, model, layer, width, consumer = family
    with pytest.raises(GrowthError, match=f"pretrained {consumer} from {width}; use --units {width}"):
        grow(model, [GrowStep("deep", layer, width + 4)], SIZE)
    with pytest.raises(GrowthError, match="identity only on non-negative inputs.*GELU"):
        grow(model, [GrowStep("deep", layer, width, init="net2net")], SIZE)


class TokenMLP(nn.Module):
    """A token model of one's own: ReLU MLP on [N, T, C], mean over tokens, head."""

    def __init__(self, act: str = "relu") -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 16, 4, stride=4)
        self.fc1 = nn.Linear(16, 24)
        self.fc2 = nn.Linear(24, 16)
        self.head = nn.Linear(16, 3)
        self.act = act

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)  # [N, T, C]
        h = self.fc1(t)
        h = F.relu(h) if self.act == "relu" else torch.tanh(h)
        return self.head(self.fc2(h).mean(1))


def test_token_model_net2net_deep_is_identity_after_relu():
    model = _seeded(TokenMLP)
    x = images(3, 16)
    with torch.no_grad():
        ref = model(x)
    gm, _ = grow(model, [GrowStep("deep", "fc1", 24, init="net2net", norm=False)], 16)
    with torch.no_grad():
        assert _rel_err(gm(x), ref) < 1e-6


def test_token_model_widens_through_a_mean_over_tokens():
    """fc2's units reach the head through ``mean(1)``: the head gets new input columns."""
    model = _seeded(TokenMLP)
    x = images(3, 16)
    with torch.no_grad():
        ref = model(x)
    gm, state = grow(model, [GrowStep("wide", "fc2", 5, init="zero", norm=False)], 16)
    assert in_channels(gm.get_submodule("head")) == 21
    with torch.no_grad():
        assert _rel_err(gm(x), ref) < 1e-6
    gm, state = grow(model, [HeadStep(classes=2), GrowStep("wide", "fc2", 5)], 16)
    assert gm.get_submodule(state.norms[0]).axis == -1


# --- refusals -----------------------------------------------------------------------------------

def _refusal(model, layer: str, kind: str = "wide") -> str:
    gm = trace(model)
    with pytest.raises(GrowthError) as info:
        apply_steps(gm, [HeadStep(classes=3), GrowStep(kind, layer, 8)], GrowthState(input_size=SIZE))
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


def _suggested(msg: str) -> list[str]:
    tail = msg.split("growable layers: ", 1)[1]
    return [s.strip() for s in tail.split(" (and ")[0].split(",")]


REFUSALS = [
    ("vit", "encoder.layers.encoder_layer_1.ln_2", "is a LayerNorm, not a Linear or Conv2d"),
    ("vit", "encoder.layers.encoder_layer_1.self_attention.out_proj",
     "inside encoder.layers.encoder_layer_1.self_attention (MultiheadAttention)"),
    ("vit", "encoder.layers.encoder_layer_1.mlp.3", "residual add"),
    ("swin", "features.3.0.attn.proj", "passes its weights to other code (attention)"),
    ("swin", "features.2.reduction", "(LayerNorm), which normalizes across the channels"),
    ("swin", "features.3.0.mlp.3", "residual add"),
    ("convnext", "features.3.0.block.5", "(permute), which surgeon cannot widen through"),
    ("convnext", "features.3.0.block.2", "is a LayerNorm"),
    ("swin_v2", "features.3.0.attn.cpb_mlp.0", "reads no image-dependent input (a constant table"),
    ("maxvit", "blocks.1.layers.0.layers.grid_attention.attn_layer.1.to_qkv", "its output feeds"),
]


@pytest.mark.parametrize("name, layer, reason", REFUSALS, ids=[r[1] for r in REFUSALS])
@pytest.mark.parametrize("kind", ["wide", "deep"])
def test_refusals_name_the_reason_and_mlp_sites(name, layer, reason, kind):
    build, site, _, _ = FAMILIES[name]
    model = _seeded(build)
    msg = _refusal(model, layer, kind)
    assert reason in msg and "growable layers: " in msg, msg
    suggested = _suggested(msg)
    assert site in suggested, msg
    gm = trace(model)
    propagate_shapes(gm, SIZE)
    for s in suggested:  # every suggestion really is a growth site
        find_site(gm, s)
    assert find_site(gm, site).axis == -1


class ChannelsLastMisuse(nn.Module):
    """Units on the last dim reaching what cannot read them."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.fc = nn.Linear(8, 8)
        self.bn = nn.BatchNorm1d(16)
        self.conv = nn.Conv2d(8, 4, 1)
        self.head = nn.Linear(8 * 16 if how == "flatten" else 4 if how.startswith("conv") else 8, 3)
        self.fc4 = nn.Linear(4, 4)

    def forward(self, x):
        if self.how == "conv-direct":  # a Linear over the last spatial dim of [N, C, H, W], then a conv
            return self.head(self.conv(torch.relu(self.fc4(self.embed(x)))).mean((2, 3)))
        t = self.embed(x).flatten(2).transpose(1, 2)  # [N, 16, 8]
        h = self.fc(t)
        if self.how == "bn":
            return self.head(self.bn(h).mean(1))
        if self.how == "mean-last":
            return self.head(torch.relu(h).mean(2, keepdim=True).expand(-1, -1, 8).mean(1))
        if self.how == "flatten":
            return self.head(torch.relu(h).flatten(1))
        return self.head(self.conv(torch.relu(h).reshape(-1, 4, 4, 8).permute(0, 3, 1, 2)).mean((2, 3)))


@pytest.mark.parametrize("how, reason", [
    ("bn", "a BatchNorm over dim 1, but the units of 'fc' are on the last dim"),
    ("mean-last", "averages over the last dim (the units)"),
    ("flatten", "reshapes a tensor whose units are on the last dim"),
    ("conv", "reshapes a tensor whose units are on the last dim"),
    ("conv-direct", "its output feeds conv, which reads dim 1, but the units are on the last dim"),
])
def test_channels_last_refusals(how, reason):
    gm = trace(_seeded(lambda: ChannelsLastMisuse(how)))
    with pytest.raises(GrowthError) as info:
        apply_steps(gm, [GrowStep("wide", "fc4" if how == "conv-direct" else "fc", 4)], GrowthState(input_size=16))
    assert reason in str(info.value) and "\n" not in str(info.value), str(info.value)


# --- old/new unit analysis at a channels-last GrowNorm --------------------------------------------

def test_unit_analysis_reads_the_last_dim():
    """``surgeon analyze``'s hooks pool tokens / positions and zero channels on the last dim."""
    from surgeon.analyze.units import capture, masked_accuracy

    build, layer, width, _ = FAMILIES["vit"]
    torch.manual_seed(1)
    gm, state = grow(_seeded(build), [HeadStep(classes=3), GrowStep("wide", layer, UNITS)], SIZE)
    calibrate_gamma(gm, images(8, SIZE))
    data = torch.utils.data.TensorDataset(images(6, SIZE, seed=5), torch.tensor([0, 1, 2, 0, 1, 2]))
    caps, preds, _ = capture(gm, data, list(range(6)), batch_size=4)
    cap = caps[state.norms[0]]
    act = Capture(gm.get_submodule(layer))  # the GrowNorm input is GELU(layer output)
    with torch.no_grad():
        logits = gm(data.tensors[0])
    act.remove()
    x = F.gelu(act.value.double())  # [N, T, C]
    assert cap.spatial and cap.activations.shape == (6, width + UNITS)
    assert torch.allclose(torch.from_numpy(cap.activations).double(), x.mean(1), atol=1e-5)
    norms = torch.stack([torch.linalg.vector_norm(x[..., :width], dim=-1).mean(1),
                         torch.linalg.vector_norm(x[..., width:], dim=-1).mean(1)], dim=1)
    assert torch.allclose(torch.from_numpy(cap.norms).double(), norms, rtol=1e-4)
    assert (preds == logits.argmax(1).numpy()).all()
    # old units only: the new ones zeroed at the GrowNorm output, on the last dim
    norm = gm.get_submodule(state.norms[0])
    handle = norm.register_forward_hook(lambda m, i, out: torch.cat([out[..., :width], out[..., width:] * 0], -1))
    with torch.no_grad():
        expect = float((gm(data.tensors[0]).argmax(1) == data.tensors[1]).float().mean())
    handle.remove()
    got = masked_accuracy(gm, state.norms[0], slice(0, width), data, list(range(6)), batch_size=4)
    assert got == pytest.approx(expect)
