"""Recipes round-trip through grown.pt; opening a checkpoint never runs code."""

from __future__ import annotations

import pickle

import json
import random
import re
import sys

import pytest
import torch

import surgeon
from surgeon.checkpoint import Checkpoint, read_checkpoint, save_checkpoint
from surgeon.errors import CheckpointError, SurgeonError
from surgeon.grow.gamma import calibrate_gamma
from surgeon.grow.recipe import GrowStep, HeadStep, read_recipe_file, recipe_from_json, recipe_to_json
from surgeon.zoo import DIGITS_PREPROCESSING

from tests.grow.helpers import digitnet, grow, images, randomize_batchnorms

STEPS = [
    HeadStep(classes=3),
    GrowStep("wide", "classifier.0", 24),
    GrowStep("wide", "features.8", 8, init="net2net", gamma_init=15.0),
    GrowStep("deep", "classifier.3", 40, eps=1e-5),
    GrowStep("wide", "classifier.3", 12, init="zero", norm=False),
]
CLASSES = ["cat", "dog", "emu"]


def error_of(fn, path, *args, exc=CheckpointError, **kwargs) -> str:
    """The one-line message ``fn(path)`` raises, with the file's path blanked out (tmp paths hold
    the test's name, which would make ``match=`` checks pass trivially)."""
    with pytest.raises(exc) as info:
        fn(path, *args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg.replace(str(path), "<FILE>")



@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    torch.manual_seed(0)
    gm, _ = grow(randomize_batchnorms(digitnet()), STEPS, 32)
    calibrate_gamma(gm, images(16, 32))
    path = tmp_path_factory.mktemp("ckpt") / "grown.pt"
    save_checkpoint(path, Checkpoint(model="surgeon:digitnet", weights="none", recipe=STEPS, classes=CLASSES,
                                     preprocessing=DIGITS_PREPROCESSING, state_dict=gm.state_dict(),
                                     history={"epochs": [{"acc": 0.5}]}))
    return gm, path


def test_load_gives_identical_outputs(grown):
    gm, path = grown
    loaded = surgeon.load(path)
    assert not loaded.training
    x = images(4, 32, seed=5)
    gm.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), gm(x), rtol=0, atol=0)
    assert loaded.state_dict().keys() == gm.state_dict().keys()
    ck = loaded.surgeon_checkpoint
    assert ck.recipe == STEPS and ck.classes == CLASSES and ck.preprocessing == DIGITS_PREPROCESSING
    assert ck.history == {"epochs": [{"acc": 0.5}]}


def test_file_is_plain_data(grown):
    _, path = grown
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "surgeon.checkpoint" and raw["format_version"] == 1
    assert raw["base"] == {"model": "surgeon:digitnet", "weights": "none"}
    json.dumps({k: v for k, v in raw.items() if k != "state_dict"})  # everything else is JSON-able
    assert all(isinstance(v, torch.Tensor) for v in raw["state_dict"].values())
    assert recipe_from_json(raw["recipe"]) == STEPS


def test_recipe_json_round_trip():
    data = recipe_to_json(STEPS)
    assert recipe_from_json(json.loads(json.dumps(data))) == STEPS
    assert data[0] == {"classes": 3, "layer": "", "op": "head"}
    assert data[2]["gamma_init"] == 15.0 and data[1]["gamma_init"] == "auto"


@pytest.mark.parametrize("text, match", [
    ("{not json", "not valid JSON"),
    ('{"kind": "wide"}', "JSON list"),
    ('[{"kind": "wide", "layer": "fc", "units": 8, "colour": "red"}]', "unknown keys"),
    ('[{"kind": "sideways", "layer": "fc", "units": 8}]', "growth kind"),
    ('[{"kind": "wide", "layer": "fc", "units": 0}]', "units"),
    ('[{"kind": "wide", "layer": "fc", "units": 8, "init": "magic"}]', "init"),
    ('[{"kind": "wide", "units": 8}]', "bad recipe step"),
    ('[{"kind": "wide", "layer": "fc", "units": 8, "gamma_init": -1}]', "positive"),
    ('[{"op": "head", "classes": 3}]', "only hold growth steps"),
    ('[3]', "not a recipe step"),
])
def test_bad_recipe_files(tmp_path, text, match):
    p = tmp_path / "recipe.json"
    p.write_text(text)
    assert re.search(match, error_of(read_recipe_file, p, exc=SurgeonError))


def test_recipe_file_ok_and_missing(tmp_path):
    p = tmp_path / "r.json"
    p.write_text('[{"kind": "wide", "layer": "classifier.3", "units": 1024}, {"kind": "deep", "layer": "classifier.3", "units": 64, "init": "net2net"}]')
    assert read_recipe_file(p) == [GrowStep("wide", "classifier.3", 1024), GrowStep("deep", "classifier.3", 64, init="net2net")]
    assert "does not exist" in error_of(read_recipe_file, tmp_path / "nope.json", exc=SurgeonError)


def test_recipe_from_json_rejects_non_list():
    with pytest.raises(SurgeonError, match="JSON list"):
        recipe_from_json({"op": "grow"})


# --------------------------------------------------------------------------------------------------
# safety

SIDE_EFFECTS: list[str] = []


def record_side_effect(what: str) -> list[str]:
    SIDE_EFFECTS.append(what)
    return SIDE_EFFECTS


class Payload:
    def __reduce__(self):
        return (record_side_effect, ("unpickled!",))


def test_pickled_object_is_refused_without_running_it(tmp_path):
    p = tmp_path / "evil.pt"
    torch.save({"format": "surgeon.checkpoint", "payload": Payload(), "w": torch.ones(2)}, p)
    SIDE_EFFECTS.clear()
    assert "pickled" in error_of(surgeon.load, p)
    assert "pickled" in error_of(read_checkpoint, p)
    assert SIDE_EFFECTS == []
    # sanity: the payload really does run when unpickled unsafely
    torch.load(p, weights_only=False)
    assert SIDE_EFFECTS == ["unpickled!"]
    SIDE_EFFECTS.clear()


def test_plain_state_dict(tmp_path):
    p = tmp_path / "sd.pt"
    torch.save(digitnet().state_dict(), p)
    msg = error_of(surgeon.load, p)
    assert "not a surgeon checkpoint" in msg and "--weights" in msg


def test_other_torch_file_is_not_a_checkpoint(tmp_path):
    p = tmp_path / "list.pt"
    torch.save([1, 2, 3], p)
    msg = error_of(surgeon.load, p)
    assert "not a surgeon checkpoint" in msg and "--weights" not in msg


@pytest.mark.parametrize("payload", [
    pytest.param(b"PK\x03\x04 truncated zip", id="bad-zip"),
    pytest.param(b"", id="empty"),
    pytest.param(b"\x80\x02}q\x00", id="truncated-pickle"),
])
def test_corrupt_files(tmp_path, payload):
    p = tmp_path / "bad.pt"
    p.write_bytes(payload)
    msg = error_of(surgeon.load, p)
    assert "corrupt" in msg and "pickled" not in msg


@pytest.mark.parametrize("payload", [
    pytest.param(b"<html><body>404 Not Found</body></html>", id="html-error-page"),  # a failed download
    pytest.param(bytes(random.Random(0).randrange(256) for _ in range(64)), id="random-bytes"),
])
def test_garbage_bytes_are_corrupt(tmp_path, payload):
    p = tmp_path / "bad.pt"
    p.write_bytes(payload)
    msg = error_of(surgeon.load, p)
    assert "corrupt" in msg and "pickled" not in msg


def test_truncated_real_checkpoint(grown, tmp_path):
    _, path = grown
    p = tmp_path / "half.pt"
    p.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert "corrupt" in error_of(surgeon.load, p)


def test_missing_file_and_directory(tmp_path):
    assert "does not exist" in error_of(surgeon.load, tmp_path / "missing.pt")
    assert "is a directory" in error_of(surgeon.load, tmp_path)


def test_user_code_checkpoint_needs_trust(tmp_path, monkeypatch):
    # a module that records being imported: refusing must happen before any import
    marker = tmp_path / "imported"
    (tmp_path / "surgeon_test_usermod.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from surgeon.zoo.digitnet import DigitNet as Net\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    net = digitnet()
    p = tmp_path / "user.pt"
    save_checkpoint(p, Checkpoint(model="surgeon_test_usermod:Net", weights="w.pt", recipe=[],
                                  classes=["a", "b"], preprocessing=DIGITS_PREPROCESSING, state_dict=net.state_dict()))
    msg = error_of(surgeon.load, p, exc=SurgeonError)
    assert "trust_code" in msg and "--trust-code" in msg and "surgeon_test_usermod:Net" in msg
    assert not marker.exists()
    # trusted: it imports and loads
    try:
        loaded = surgeon.load(p, trust_code=True)
    finally:
        sys.modules.pop("surgeon_test_usermod", None)
    assert marker.exists()
    with torch.no_grad():
        torch.testing.assert_close(loaded(images(2, 32)), net.eval()(images(2, 32)))


def test_weights_that_do_not_fit_recipe(grown, tmp_path):
    gm, _ = grown
    p = tmp_path / "mismatch.pt"
    save_checkpoint(p, Checkpoint(model="surgeon:digitnet", weights="none", recipe=STEPS[:2], classes=CLASSES,
                                  preprocessing=DIGITS_PREPROCESSING, state_dict=gm.state_dict()))
    assert "do not fit its recipe" in error_of(surgeon.load, p)


def test_newer_format_version_is_refused(grown, tmp_path):
    _, path = grown
    raw = torch.load(path, weights_only=True)
    raw["format_version"] = 99
    p = tmp_path / "future.pt"
    torch.save(raw, p)
    assert "upgrade surgeon" in error_of(surgeon.load, p)


def test_damaged_checkpoint_fields(grown, tmp_path):
    _, path = grown
    raw = torch.load(path, weights_only=True)
    del raw["classes"]
    p = tmp_path / "damaged.pt"
    torch.save(raw, p)
    assert "damaged" in error_of(surgeon.load, p)


def test_save_is_atomic_on_failure(tmp_path):
    p = tmp_path / "out.pt"
    p.write_bytes(b"previous")

    unpicklable = {"f": lambda: 0}  # torch.save fails half way through writing
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        save_checkpoint(p, Checkpoint(model="surgeon:digitnet", weights="none", recipe=[], classes=["a", "b"],
                                      preprocessing=DIGITS_PREPROCESSING, state_dict={"w": torch.ones(3)},
                                      history=unpicklable))
    assert p.read_bytes() == b"previous"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out.pt"]


# --------------------------------------------------------------------------------------------------
# recipe validation: recipes come from users' files and from (untrusted) checkpoints


@pytest.mark.parametrize("extra", [
    pytest.param({"units": True}, id="units-true"),
    pytest.param({"eps": 0}, id="eps-zero"),
    pytest.param({"eps": -1.0}, id="eps-negative"),
    pytest.param({"eps": "tiny"}, id="eps-string"),
    pytest.param({"norm": "false"}, id="norm-string"),
])
def test_recipe_step_field_types_are_validated(tmp_path, extra):
    p = tmp_path / "r.json"
    p.write_text(json.dumps([{"kind": "wide", "layer": "classifier.3", "units": 8, **extra}]))
    error_of(read_recipe_file, p, exc=SurgeonError)


def test_checkpoint_with_bad_head_step_is_a_one_line_error(grown, tmp_path):
    _, path = grown
    raw = torch.load(path, weights_only=True)
    raw["recipe"][0]["classes"] = "3"
    p = tmp_path / "badhead.pt"
    torch.save(raw, p)
    error_of(surgeon.load, p, exc=SurgeonError)


def test_one_copy_rebuild_that_fails_says_why_and_builds_whole(grown, monkeypatch, caplog):
    """The shared-weights build falls back to a full-memory build with a warning that gives the reason."""
    from surgeon.checkpoint import Checkpoint, read_checkpoint

    gm, path = grown
    real = Checkpoint._grow

    def fail_unless_ordinary(self, trust_code, mode):
        if mode != "ordinary":
            raise NotImplementedError(f"no {mode} build for this model")
        return real(self, trust_code, mode)

    monkeypatch.setattr(Checkpoint, "_grow", fail_unless_ordinary)
    with caplog.at_level("WARNING", logger="surgeon"):
        rebuilt = read_checkpoint(path).build_model(share_weights=True)
    (record,) = [r for r in caplog.records if "one copy of the weights failed" in r.getMessage()]
    assert "meta: NotImplementedError: no meta build" in record.getMessage()
    assert "uninitialized: NotImplementedError" in record.getMessage()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), gm.eval()(x))
