"""surgeon.zoo.load_base: local weight files, the torchvision cache, and clear errors (no network)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.hub
import torchvision

from surgeon.checkpoint import read_checkpoint
from surgeon.errors import SurgeonError
from surgeon.zoo import BaseModel, build_architecture, load_base, load_state_dict_file


@pytest.fixture(autouse=True)
def _no_downloads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"tried to download {args[:1]}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


@pytest.fixture(scope="module")
def resnet_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(11)
    sd = torchvision.models.get_model("resnet18", weights=None).state_dict()
    # make every tensor distinctive, including buffers a fresh model would have at defaults
    return {k: (v + torch.randn_like(v.float()).to(v.dtype) if v.is_floating_point() else v + 3) for k, v in sd.items()}


@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory, resnet_state):
    p = tmp_path_factory.mktemp("weights") / "resnet18_random.pth"
    torch.save(resnet_state, p)
    return p


def _same(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    got = module.state_dict()
    assert got.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(got[k], v), k


def error_of(fn, *args, blank=(), **kwargs) -> str:
    with pytest.raises(SurgeonError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg, msg
    for b in blank:  # tmp paths carry the test's name
        msg = msg.replace(str(b), "<FILE>")
    return msg


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".bin"])
def test_local_state_dict_file(tmp_path, resnet_state, resnet_file, suffix):
    p = tmp_path / f"weights{suffix}"
    p.symlink_to(resnet_file)
    base = load_base("torchvision:resnet18", str(p))
    assert isinstance(base, BaseModel) and base.model == "torchvision:resnet18" and base.weights == str(p)
    _same(base.module, resnet_state)
    assert base.preprocessing.input_size == 224


def test_wrapped_state_dicts(tmp_path, resnet_state):
    """{'model': sd, ...} files (torchvision reference scripts) load too ({'state_dict': ...}: see the
    surgeon checkpoint test below)."""
    p = tmp_path / "ref_script_checkpoint.pth"
    torch.save({"model": resnet_state, "epoch": 7}, p)
    _same(load_base("torchvision:resnet18", str(p)).module, resnet_state)


def test_surgeon_checkpoint_as_weights(digitnet_path):
    base = load_base("surgeon:digitnet", str(digitnet_path))
    _same(base.module, read_checkpoint(digitnet_path).state_dict)
    assert base.preprocessing.input_size == 32


def test_weights_enum_from_torch_home_cache(tmp_path, monkeypatch, resnet_state, resnet_file):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    cache = tmp_path / "hub" / "checkpoints" / os.path.basename(url)
    cache.parent.mkdir(parents=True)
    # Not the real weights, so the hash prefix in the file name (resnet18-f37072fd) does not match:
    # torchvision passes check_hash=True, but torch.hub only checks it when it downloads.
    cache.symlink_to(resnet_file)
    base = load_base("torchvision:resnet18", "IMAGENET1K_V1")
    _same(base.module, resnet_state)
    assert base.weights == "IMAGENET1K_V1"
    assert (base.preprocessing.input_size, base.preprocessing.resize) == (224, 256)
    # DEFAULT resolves to the V1 enum for resnet18
    _same(load_base("torchvision:resnet18", "DEFAULT").module, resnet_state)


def test_weights_enum_not_cached_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    msg = error_of(load_base, "torchvision:resnet18", "IMAGENET1K_V1")
    assert "could not download" in msg and "--weights none" in msg


def test_wrong_shape_weights(tmp_path):
    p = tmp_path / "ten_classes.pth"
    torch.save(torchvision.models.get_model("resnet18", weights=None, num_classes=10).state_dict(), p)
    msg = error_of(load_base, "torchvision:resnet18", str(p), blank=[p])
    assert "do not fit torchvision:resnet18" in msg and "fc.weight" in msg


def test_unknown_torchvision_model_and_weights():
    msg = error_of(load_base, "torchvision:resnet19", "none")
    assert "no classification model 'resnet19'" in msg
    msg = error_of(load_base, "torchvision:resnet18", "IMAGENET9K_V9")
    assert "IMAGENET1K_V1" in msg  # lists the enums that exist


def test_unsafe_weights_file_is_refused(tmp_path):
    ran = []

    class Obj:
        def __reduce__(self):
            return (ran.append, ("ran",))

    p = tmp_path / "pickled.pth"
    torch.save({"fc.weight": torch.ones(1), "x": Obj()}, p)
    msg = error_of(load_base, "torchvision:resnet18", str(p), blank=[p])
    assert "safely" in msg and ran == []


def test_not_a_state_dict_and_missing_file(tmp_path):
    p = tmp_path / "list.pth"
    torch.save([torch.ones(2)], p)
    assert "does not hold a state dict" in error_of(load_state_dict_file, p, blank=[p])
    assert "does not exist" in error_of(load_state_dict_file, tmp_path / "nope.pth", blank=[tmp_path / "nope.pth"])
    assert "does not exist" in error_of(load_base, "torchvision:resnet18", str(tmp_path / "nope.pth"),
                                        blank=[tmp_path / "nope.pth"])


def test_surgeon_arch_weights_must_be_default_file_or_none():
    assert "DEFAULT, none or a file" in error_of(load_base, "surgeon:digitnet", "IMAGENET1K_V1")
    assert "unknown surgeon architecture" in error_of(load_base, "surgeon:bignet", "none")
    assert load_base("surgeon:digitnet", "none").weights == "none"


def test_input_size_override():
    pre = load_base("torchvision:resnet18", "none", input_size=64).preprocessing
    assert pre.input_size == 64 and pre.resize == round(64 / 0.875)
    pre = load_base("surgeon:digitnet", "none", input_size=48).preprocessing
    assert pre.input_size == 48 and pre.resize == 48  # digitnet does not crop


def test_user_factory(tmp_path):
    f = tmp_path / "mynet.py"
    f.write_text("import torch\n"
                 "def make():\n    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))\n"
                 "def not_a_module():\n    return 3\n")
    base = load_base(f"{f}:make", "none")
    assert isinstance(base.module, torch.nn.Sequential)
    assert "not a torch.nn.Module" in error_of(load_base, f"{f}:not_a_module", "none", blank=[f])
    assert "no class or function 'nope'" in error_of(load_base, f"{f}:nope", "none", blank=[f])
    assert "cannot import" in error_of(load_base, "surgeon_no_such_module_xyz:Net", "none")


def test_build_architecture_refuses_user_code_without_trust():
    msg = error_of(build_architecture, "os:system", trust_code=False)
    assert "--trust-code" in msg


def test_builtin_default_weights_are_the_shipped_checkpoint(digitnet_path):
    from surgeon.zoo import load_base

    base = load_base("surgeon:digitnet", "DEFAULT")
    shipped = torch.load(digitnet_path, weights_only=True)["state_dict"]
    got = base.module.state_dict()
    assert base.weights == str(digitnet_path)
    assert got.keys() == shipped.keys() and all(torch.equal(got[k], shipped[k]) for k in got)
    assert load_base("surgeon:digitnet", "none").weights == "none"
    assert load_base("torchvision:resnet18", "none").weights == "none"


def _ordinary_layers(spec: str, size: int):
    from surgeon.grow.analysis import layer_table, propagate_shapes, trace

    gm = trace(load_base(spec, "none").module)
    propagate_shapes(gm, size)
    return layer_table(gm)


@pytest.mark.parametrize("name, size", [("resnet18", 64), ("convnext_tiny", 64), ("regnet_y_400mf", 64), ("vit_b_32", 224)])
def test_layers_structure_on_the_meta_device_matches_a_real_model(name, size):
    """`surgeon layers --weights none` builds on the meta device (RegNet's constructor needs real
    tensors: built uninitialized, then moved there) and lists what the real model would."""
    from surgeon.commands.layers import analysed_layers

    spec = f"torchvision:{name}"
    assert next(load_base(spec, "none", meta=True).module.parameters()).is_meta
    assert analysed_layers(spec, "none", size) == _ordinary_layers(spec, size)


def test_layers_falls_back_where_the_meta_device_cannot_run_the_model(tmp_path):
    f = tmp_path / "cpunet.py"
    f.write_text("import torch\n"
                 "class Net(torch.nn.Module):\n"
                 "    def __init__(self):\n        super().__init__()\n"
                 "        self.fc1, self.fc2 = torch.nn.Linear(12, 6), torch.nn.Linear(6, 2)\n"
                 "    def forward(self, x):\n"
                 "        return self.fc2(torch.relu(self.fc1(x.mean((2, 3)).repeat(1, 4) + torch.ones(12))))\n")
    from surgeon.commands.layers import analysed_layers

    rows = analysed_layers(f"{f}:Net", "none", 8)
    assert [(r.name, r.wide) for r in rows] == [("fc1", "ok"), ("fc2", "classifier head (replaced for the new task)")]


def test_weights_free_vit_gets_its_own_input_size():
    """vit_h_14 without weights is a 224px model (its DEFAULT weights are the 518px SWAG variant)."""
    assert load_base("torchvision:vit_h_14", "none", meta=True).preprocessing.input_size == 224
    assert load_base("torchvision:vit_b_16", "none", meta=True).preprocessing.input_size == 224
