"""The Python API (surgeon.grow_model, param_groups, save, export_onnx, build): the CLI's growth,
groups and checkpoint, in a loop the user owns."""

from __future__ import annotations

import copy
import inspect
import json
import re
import subprocess
import sys

import pytest
import torch
import torchvision
from click.testing import CliRunner
from torch import nn

import surgeon
from surgeon.cli import cli
from surgeon.grow.grownorm import GrowNorm
from surgeon.train.data import load_data
from surgeon.train.finetune import _calibration_batch
from surgeon.zoo import DIGITS_PREPROCESSING

from tests.conftest import ROOT


class TinyNet(nn.Module):
    """Importable by name (tests.test_api:TinyNet) and built without arguments: recordable."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc1 = nn.Linear(8, 16)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(self.features(x))))


@pytest.fixture(scope="module")
def digits():
    return load_data("builtin:digits-target", DIGITS_PREPROCESSING, augment=False)


@pytest.fixture(scope="module")
def calib(digits):
    return _calibration_batch(digits, 256, 0)  # the batch `surgeon finetune --seed 0` calibrates on


def _grown(calib, classes, **kw):
    torch.manual_seed(0)
    return surgeon.grow_model("surgeon:digitnet", [surgeon.Wide("classifier.3", 32)], classes=classes, calib=calib, **kw)


def test_import_surgeon_loads_no_torch_until_an_api_name_is_used():
    code = ("import sys, surgeon; names = dir(surgeon); assert 'grow_model' in names; "
            "print('torch' in sys.modules); surgeon.Wide; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.split() == ["False", "True"]
    with pytest.raises(AttributeError, match="no attribute 'grow_modle'"):
        surgeon.grow_modle  # noqa: B018


def test_api_checkpoint_has_the_cli_format_and_calibration(tmp_path, digits, calib):
    out = tmp_path / "cli"
    res = CliRunner().invoke(cli, [
        "finetune", "--model", "surgeon:digitnet", "--data", "builtin:digits-target", "--grow", "wide", "--layer",
        "classifier.3", "--units", "32", "--epochs", "1", "-b", "64", "--workers", "0", "--device", "cpu", "--quiet",
        "--no-augment", "--output-dir", str(out)])
    assert res.exit_code == 0, res.output
    grown = _grown(calib, digits.classes)
    path = surgeon.save(grown, tmp_path / "api" / "grown.pt", history=[{"epoch": 1, "val_acc": 0.5}])
    a, b = (torch.load(p, weights_only=True) for p in (out / "grown.pt", path))
    assert a.keys() == b.keys()
    for key in ("format", "format_version", "surgeon_version", "base", "recipe", "classes", "preprocessing"):
        assert a[key] == b[key], key
    assert {k: v.shape for k, v in a["state_dict"].items()} == {k: v.shape for k, v in b["state_dict"].items()}
    assert a["history"].keys() == b["history"].keys() == {"epochs", "gamma_init"}
    assert b["history"]["epochs"] == [{"epoch": 1, "val_acc": 0.5}]
    # γ "auto" from the same batch: the pretrained activations fix it, so CLI and API agree.
    for name, values in a["history"]["gamma_init"].items():
        assert b["history"]["gamma_init"][name] == pytest.approx(values, rel=1e-6), name
    # Every later stage takes it: surgeon.load rebuilds the same function, surgeon export verifies it.
    grown.eval()
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(surgeon.load(path)(x), grown(x), rtol=0, atol=0)
    res = CliRunner().invoke(cli, ["export", str(path), "-o", str(tmp_path / "model.onnx")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "model.onnx").exists()


def test_param_groups_follow_the_paper_and_freeze_what_does_not_train(calib, digits):
    grown = _grown(calib, digits.classes)
    groups = surgeon.param_groups(grown, lr=0.01, new_lr_mult=10, tune="top")
    by_name = {g["name"]: g for g in groups}
    assert {n: g["lr"] for n, g in by_name.items()} == {"pretrained": 0.01, "new": pytest.approx(0.1),
                                                        "new gamma": pytest.approx(0.1)}
    assert by_name["new gamma"]["weight_decay"] == 0.0 and "weight_decay" not in by_name["new"]  # the optimizer's
    names = {id(p): n for n, p in grown.named_parameters()}
    grouped = {names[id(p)] for g in groups for p in g["params"]}
    assert {"classifier.3.new.weight", "classifier.6.weight", "classifier_3_norm.gamma"} <= grouped
    assert {n for n, p in grown.named_parameters() if not p.requires_grad} == {
        n for n in names.values() if n.startswith("features.") or n.startswith("classifier.0.")}
    assert grouped.isdisjoint(n for n, p in grown.named_parameters() if not p.requires_grad)

    # A frozen BatchNorm keeps its statistics in the user's own model.train() loop.
    bn = grown.get_submodule("features.1")
    before = bn.running_mean.clone()
    optimizer = torch.optim.SGD(groups, lr=0.01, momentum=0.9, weight_decay=5e-4)
    grown.train()
    loss = nn.functional.cross_entropy(grown(calib[:16]), torch.zeros(16, dtype=torch.long))
    loss.backward()
    optimizer.step()
    assert torch.equal(bn.running_mean, before)
    assert grown.get_submodule("classifier_3_norm").gamma.grad is not None


def test_grow_further_from_a_saved_model_keeps_the_recipe(tmp_path, calib, digits):
    path = surgeon.save(_grown(calib, digits.classes), tmp_path / "grown.pt")
    again = surgeon.grow_model(surgeon.load(path), [surgeon.Deep("classifier.3", 160, gamma_init=10.0)])
    second = surgeon.save(copy.deepcopy(again), tmp_path / "again.pt")  # a deep copy (an EMA, say) stays saveable
    raw = torch.load(second, weights_only=True)
    assert [s["op"] for s in raw["recipe"]] == ["head", "grow", "grow"]
    assert raw["recipe"][-1]["kind"] == "deep" and raw["classes"] == list(digits.classes)
    norm = again.get_submodule("classifier_3_deep_norm")
    assert isinstance(norm, GrowNorm) and torch.all(norm.gamma == 10.0)
    again.eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(surgeon.load(second)(x), again(x))


def test_a_torchvision_module_is_recorded_by_its_builder(tmp_path):
    torch.manual_seed(0)
    grown = surgeon.grow_model(torchvision.models.resnet18(), [surgeon.Wide("layer4.1.conv1", 16, gamma_init=20.0)],
                               classes=["a", "b", "c"], input_size=64)
    info = grown.surgeon_grown
    assert (info.model, info.weights, info.preprocessing.input_size) == ("torchvision:resnet18", "module", 64)
    path = surgeon.save(grown, tmp_path / "grown.pt", preprocessing={"mean": (0.5, 0.5, 0.5)})
    model = surgeon.load(path)
    assert model.surgeon_checkpoint.preprocessing.mean == (0.5, 0.5, 0.5)
    grown.eval()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(model(x), grown(x))


def test_a_timm_module_is_recorded_by_its_name_and_tag():
    timm = pytest.importorskip("timm")
    grown = surgeon.grow_model(timm.create_model("resnet18", pretrained=False), classes=3, gamma_init=1.0)
    info = grown.surgeon_grown
    assert info.model == "timm:resnet18.a1_in1k" and info.preprocessing.resize == 235  # timm's crop_pct 0.95


def test_a_user_class_is_recorded_by_name_and_rebuilt_with_trust_code(tmp_path):
    grown = surgeon.grow_model(TinyNet(), [surgeon.Wide("fc1", 8)], input_size=16, gamma_init=10.0)
    assert grown.surgeon_grown.model == "tests.test_api:TinyNet"
    path = surgeon.save(grown, tmp_path / "grown.pt", classes=list("abcd"))  # the head was kept: 4 outputs
    with pytest.raises(surgeon.SurgeonError, match="trust_code"):
        surgeon.load(path)
    grown.eval()
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(surgeon.load(path, trust_code=True)(x), grown(x))


def test_an_unrecordable_module_grows_and_trains_but_save_says_why(tmp_path):
    class Local(TinyNet):
        pass

    for model, why in ((Local(), "defined in a script or a function"),
                       (torchvision.models.resnet18(num_classes=10), "not those of torchvision:resnet18 (was it built with other arguments")):
        grown = surgeon.grow_model(model, [surgeon.Wide("fc1" if isinstance(model, TinyNet) else "layer4.1.conv1", 8)],
                                   classes=2, input_size=32, gamma_init=1.0)
        grown(torch.randn(2, 3, 32, 32)).sum().backward()
        with pytest.raises(surgeon.SurgeonError, match=re.escape(why)) as err:
            surgeon.save(grown, tmp_path / "grown.pt", classes=["a", "b"])
        assert "\n" not in str(err.value) and "arch=" in str(err.value)
    assert not (tmp_path / "grown.pt").exists()


@pytest.mark.parametrize("call, message", [
    (lambda: surgeon.grow_model(torchvision.models.resnet18(num_classes=10), arch="torchvision:resnet18", input_size=32),
     "arch='torchvision:resnet18' builds different layers than the model (first difference: fc.bias)"),
    (lambda: surgeon.grow_model(TinyNet(), [surgeon.Wide("fc1", 8)], input_size=16),
     "gamma_init='auto' sets GrowNorm's scale from data: pass calib="),
    (lambda: surgeon.grow_model(TinyNet(), [surgeon.Wide("fc1", 8)], gamma_init=1.0), "pass input_size="),
    (lambda: surgeon.grow_model(TinyNet(), ["fc1"], input_size=16), "surgeon.Wide(layer, units) or surgeon.Deep"),
    (lambda: surgeon.grow_model(TinyNet(), classes="abc", input_size=16), "a number or a list of class names"),
    (lambda: surgeon.Wide("fc1", 0), "--units must be a positive integer"),
    (lambda: surgeon.Deep("fc1", 8, init="sideways"), "--init must be one of"),
    (lambda: surgeon.param_groups(TinyNet(), lr=0.1), "not grown by surgeon"),
    (lambda: surgeon.param_groups(surgeon.grow_model(TinyNet(), input_size=16), lr=0.1, tune="most"),
     "tune must be one of new, top, all"),
    (lambda: surgeon.save(surgeon.grow_model(TinyNet(), classes=3, input_size=16), "x.pt"), "name the model's 3 classes"),
    (lambda: surgeon.save(surgeon.grow_model(TinyNet(), classes=3, input_size=16), "x.pt", classes=["a"]),
     "1 class names for a head of 3 outputs"),
    (lambda: surgeon.save(surgeon.grow_model(TinyNet(), classes=3, input_size=16), "x.pt", classes="abc",
                          preprocessing={"crop": 3}), "unknown preprocessing keys ['crop']"),
    (lambda: surgeon.export_onnx(surgeon.grow_model(TinyNet(), classes=3, input_size=16)), "name the ONNX file"),
])
def test_bad_input_gives_one_line_errors(call, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(surgeon.SurgeonError) as err:
        call()
    assert message in str(err.value) and "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_export_a_module_and_build_it(tmp_path, calib, digits):
    grown = _grown(calib, digits.classes)
    result = surgeon.export_onnx(grown, tmp_path / "model.onnx", batch="1:2:4")
    assert result.path == tmp_path / "model.onnx" and all(c.ok for c in result.verifications)
    import onnxruntime as ort

    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["surgeon.classes"]) == list(digits.classes) and meta["surgeon.base_model"] == "surgeon:digitnet"
    grown.eval()
    x = calib[:3]
    (logits,) = session.run(None, {"images": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(logits), grown(x).detach(), rtol=1e-4, atol=1e-4)
    pytest.importorskip("tensorrt_rtx")
    report = surgeon.build(result.path, tmp_path / "model.engine", builder="tensorrt-rtx")
    assert (tmp_path / "model.engine").stat().st_size > 0 and report.grownorm_nodes == 1


def _api_sections() -> dict[str, str]:
    text = (ROOT / "docs" / "API.md").read_text()
    parts = re.split(r"^### `surgeon\.([A-Za-z_]+)`\s*$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def test_every_public_name_is_documented_with_its_parameters():
    sections = _api_sections()
    assert set(surgeon.__all__) <= set(sections), sorted(set(surgeon.__all__) - set(sections))
    for name in surgeon.__all__:
        obj = getattr(surgeon, name)
        if callable(obj) and not isinstance(obj, type) or name in ("Wide", "Deep"):
            params = inspect.signature(obj).parameters
            missing = [p for p in params if not re.search(rf"\b{p}\b", sections[name])]
            assert missing == [], f"docs/API.md's surgeon.{name} does not show {missing}"
        assert "```python" in sections[name], f"docs/API.md's surgeon.{name} has no example"
