"""``--model timm:NAME``: layers, growth, checkpoint rebuild, export, and the one-line errors (offline)."""

from __future__ import annotations

import sys

import pytest
import torch

timm = pytest.importorskip("timm")

import surgeon  # noqa: E402
from surgeon.checkpoint import Checkpoint, read_checkpoint, save_checkpoint  # noqa: E402
from surgeon.cli import cli  # noqa: E402
from surgeon.commands.layers import analysed_layers  # noqa: E402
from surgeon.errors import SurgeonError  # noqa: E402
from surgeon.export.onnx_export import export_checkpoint  # noqa: E402
from surgeon.grow.grownorm import GrowNorm  # noqa: E402
from surgeon.grow.recipe import GrowStep, HeadStep  # noqa: E402
from surgeon.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing  # noqa: E402
from surgeon.zoo import build_architecture, load_base  # noqa: E402
from tests.grow.helpers import grow, images, randomize_batchnorms  # noqa: E402

STEPS = [HeadStep(classes=3), GrowStep("wide", "layer4.1.conv1", 8, init="net2net", gamma_init=12.0)]
SIZE = 32


def one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(SurgeonError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


def layers_cli(*args: str):
    from click.testing import CliRunner

    return CliRunner().invoke(cli, ["layers", *args])


@pytest.fixture(autouse=True)
def _no_downloads(monkeypatch):
    """Nothing here may reach the network: a pretrained build fails as it does offline."""
    real = timm.create_model

    def offline(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("An error happened while trying to locate the file on the Hub. Check your connection")
        return real(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)


def test_resnet18_layers_listing():
    res = layers_cli("--model", "timm:resnet18", "--input-size", "64", "--all")
    assert res.exit_code == 0, res.output
    rows = {ln.split()[0]: ln for ln in res.output.splitlines()[1:] if ln.strip()}
    assert rows["layer4.1.conv1"].split()[1:5] == ["Conv2d", "512", "512", "3x3"]
    assert rows["layer4.1.conv1"].split()[-2:] == ["ok", "ok"]
    assert "residual add" in rows["layer4.1.conv2"]
    assert "classifier head" in rows["fc"]


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny_patch16_224", "convnext_atto", "efficientnet_b0", "mobilenetv3_small_100"])
def test_layers_lists_or_refuses_in_one_line(name):
    res = layers_cli("--model", f"timm:{name}")
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    if res.exit_code == 0:
        assert lines[0].split()[:2] == ["layer", "type"] and len(lines) >= 2, res.output
    else:
        assert len(lines) == 1 and lines[0].startswith("error"), res.output


def test_meta_device_listing_matches_the_ordinary_one():
    """`surgeon layers` builds on the meta device; it must list what a real model would."""
    meta = analysed_layers("timm:convnext_atto", "none", 64)
    from surgeon.grow.analysis import layer_table, propagate_shapes, trace

    gm = trace(load_base("timm:convnext_atto", "none").module)
    propagate_shapes(gm, 64)
    assert meta == layer_table(gm)


def test_preprocessing_comes_from_timms_data_config():
    pre = load_base("timm:resnet18", "none").preprocessing
    assert pre == Preprocessing(input_size=224, resize=235, mean=IMAGENET_MEAN, std=IMAGENET_STD)  # crop_pct 0.95
    vit = load_base("timm:vit_tiny_patch16_224", "none").preprocessing
    assert (vit.input_size, vit.resize, vit.mean, vit.std) == (224, 248, (0.5,) * 3, (0.5,) * 3)  # crop_pct 0.9
    assert load_base("timm:resnet18", "none", input_size=SIZE).preprocessing.input_size == SIZE


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    torch.manual_seed(0)
    base = load_base("timm:resnet18", "none", input_size=SIZE)
    gm, _ = grow(randomize_batchnorms(base.module), STEPS, SIZE)
    with torch.no_grad():
        for m in gm.modules():
            if isinstance(m, GrowNorm):
                m.gamma.uniform_(0.5, 3.0)
    path = tmp_path_factory.mktemp("timm") / "grown.pt"
    save_checkpoint(path, Checkpoint(model="timm:resnet18", weights="none", recipe=STEPS, classes=["a", "b", "c"],
                                     preprocessing=base.preprocessing, state_dict=gm.state_dict()))
    return gm, path


def test_growth_adds_units_and_rebuilds_identically(grown):
    gm, path = grown
    assert read_checkpoint(path).model == "timm:resnet18"
    assert any(isinstance(m, GrowNorm) for m in gm.modules())
    x = images(2, SIZE, seed=3)
    gm.eval()
    with torch.no_grad():
        want = gm(x)
        assert want.shape == (2, 3)
        torch.testing.assert_close(surgeon.load(path)(x), want, rtol=0, atol=0)
        # the weight-sharing build (meta device, else uninitialized) that export uses
        shared = read_checkpoint(path).build_model(share_weights=True)
        torch.testing.assert_close(shared(x), want, rtol=0, atol=0)


def test_export_verifies(grown, tmp_path):
    _, path = grown
    result = export_checkpoint(path, tmp_path / "m.onnx")
    assert result.grownorm_nodes <= 1 and result.path is not None and result.path.exists()
    assert result.verifications and all(c.ok and c.rel_err < 1e-4 for c in result.verifications)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_weights_file(tmp_path, suffix):
    torch.manual_seed(4)
    state = {k: v + 1 if v.is_floating_point() else v for k, v in timm.create_model("resnet18").state_dict().items()}
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    base = load_base("timm:resnet18", str(path))
    assert base.weights == str(path)
    got = base.module.state_dict()
    assert all(torch.equal(got[k], v) for k, v in state.items())


def test_default_weights_offline_is_one_line():
    msg = one_line_error(load_base, "timm:resnet18", "DEFAULT")
    assert "could not download the pretrained weights of timm:resnet18" in msg and "--weights none" in msg


def test_other_weights_values_are_refused():
    msg = one_line_error(load_base, "timm:resnet18", "IMAGENET1K_V1")
    assert "DEFAULT, none or a file" in msg and "timm:resnet18.TAG" in msg


def test_unknown_name_suggests_close_matches():
    msg = one_line_error(load_base, "timm:resnet1", "none")
    assert msg.startswith("timm has no model 'resnet1'; did you mean ") and "resnet18" in msg
    assert "timm.list_models" in one_line_error(build_architecture, "timm:qqqqzzzz")


def test_missing_timm_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` raises ImportError
    msg = one_line_error(load_base, "timm:resnet18", "none")
    assert "pip install 'surgeon[timm]'" in msg
    assert "pip install 'surgeon[timm]'" in one_line_error(build_architecture, "timm:resnet18")
    res = layers_cli("--model", "timm:resnet18")
    assert res.exit_code != 0 and res.output.strip().count("\n") == 0 and "surgeon[timm]" in res.output


# timm's inverted-residual blocks normalize with BatchNormAct2d (BatchNorm, dropout, activation in one module).
EFFNET, EXPANSION, DEPTHWISE_BN = "efficientnet_b0", "blocks.6.0.conv_pw", "blocks.6.0.bn2"


@pytest.fixture(scope="module")
def effnet():
    torch.manual_seed(0)
    return randomize_batchnorms(load_base(f"timm:{EFFNET}", "none", input_size=SIZE).module).eval()


def test_batchnorm_act_stays_one_node_that_follows_train_and_eval(effnet):
    """Traced through, BatchNormAct2d's own `if self.training` would freeze its statistics."""
    import copy

    from surgeon.grow.analysis import trace

    gm = trace(copy.deepcopy(effnet))  # the GraphModule shares the modules: train() here must not reach the fixture
    assert any(n.op == "call_module" and n.target == "bn1" for n in gm.graph.nodes)
    before = gm.get_submodule("bn1").running_mean.clone()
    gm.train()
    gm(images(4, SIZE, seed=1))
    assert not torch.equal(before, gm.get_submodule("bn1").running_mean)


def test_expansion_conv_with_batchnorm_act_grows(effnet, tmp_path):
    from surgeon.grow.modules import SplitBatchNorm

    rows = {r.name: r for r in analysed_layers(f"timm:{EFFNET}", "none", SIZE)}
    assert rows[EXPANSION].wide == "ok" and rows["blocks.1.0.conv_pw"].wide == "ok"
    x = images(3, SIZE, seed=5)
    with torch.no_grad():
        ref = effnet(x)
    for init in ("net2net", "zero"):
        torch.manual_seed(2)
        gm, _ = grow(effnet, [GrowStep("wide", EXPANSION, 12, init=init, norm=False)], SIZE)
        with torch.no_grad():
            assert float((gm(x) - ref).abs().max() / ref.abs().max()) <= 1e-5, init
    gm, state = grow(effnet, [HeadStep(classes=3), GrowStep("wide", EXPANSION, 12)], SIZE)
    split = gm.get_submodule(DEPTHWISE_BN)
    assert isinstance(split, SplitBatchNorm) and split.bn_only and type(split.new) is torch.nn.BatchNorm2d
    (norm,) = state.norms
    node = next(n for n in gm.graph.nodes if n.target == norm)
    act = node.args[0]  # the GrowNorm follows the BatchNorm's own activation, now a node of its own
    assert isinstance(gm.get_submodule(act.target)[1], torch.nn.SiLU) and act.args[0].target == DEPTHWISE_BN
    path = tmp_path / "grown.pt"
    save_checkpoint(path, Checkpoint(model=f"timm:{EFFNET}", weights="none", recipe=state_steps(state, 12),
                                     classes=["a", "b", "c"], preprocessing=Preprocessing(input_size=SIZE),
                                     state_dict=gm.state_dict()))
    with torch.no_grad():
        torch.testing.assert_close(surgeon.load(path)(x), gm.eval()(x), rtol=0, atol=0)
    result = export_checkpoint(path, tmp_path / "m.onnx")
    assert result.verifications and all(c.ok and c.rel_err < 1e-4 for c in result.verifications)
    merged = next(p for p in result.passes if p["pass"] == "merge-parallel")
    assert any("BatchNorm" in str(c) for c in merged["changed"]), merged  # the split BatchNorm is one op again


def state_steps(state, units: int):
    return [HeadStep(classes=3, layer=state.head), GrowStep("wide", EXPANSION, units)]
