"""Hostile external data: no reader of a user's ONNX file follows a tensor's ``location`` out of the
model's folder, or past the end of its data file.

Each case is a tiny model (Flatten → MatMul with an external weight) in ``tmp/model/``, and a
sentinel file ``tmp/outside.bin`` that a careless reader would feed as the weight. Every reader —
the check itself, LeanModel.load, verify (library and CLI), Session, build and the Triton
repository writer — must refuse with a one-line SurgeonError that names the tensor and the location.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from surgeon.cli import cli
from surgeon.errors import SurgeonError
from surgeon.export.lean import LeanModel
from surgeon.export.onnx_io import check_external_data, load_onnx
from surgeon.export.verify import Reference
from surgeon.export.verify import verify as verify_onnx
from surgeon.runtime import Session
from surgeon.runtime.triton_repo import write_repository
from tests.export.test_onnx_export import _grown_checkpoint

IN, OUT = 3 * 32 * 32, 4          # a digits-sized image in, four classes out (fits _grown_checkpoint)
NBYTES = IN * OUT * 4             # the weight's float32 bytes


def _weight() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((IN, OUT)).astype(np.float32)


def _write_model(folder: Path, external: dict[str, str], name: str = "model.onnx") -> Path:
    """images [N, 3, 32, 32] → Flatten → MatMul(W) → logits [N, 4], W's data at ``external``."""
    weight = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[IN, OUT], data_location=TensorProto.EXTERNAL)
    for key, value in external.items():
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["images"], ["flat"]), helper.make_node("MatMul", ["flat", "W"], ["logits"])],
        "hostile", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", OUT])], initializer=[weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(model.SerializeToString())  # as is: onnx.save would not touch external refs, but be plain
    return path


@pytest.fixture
def sentinel(tmp_path) -> Path:
    """The file outside the model's folder: as many bytes as the weight needs, all 7.0."""
    path = tmp_path / "outside.bin"
    path.write_bytes(np.full(IN * OUT, 7.0, np.float32).tobytes())
    return path


def _hostile(case: str, tmp_path: Path, sentinel: Path) -> tuple[Path, str]:
    """(model path, the location the error must name) for each hostile case."""
    folder = tmp_path / "model"
    folder.mkdir()
    if case == "dotdot":
        return _write_model(folder, {"location": "../outside.bin"}), "../outside.bin"
    if case == "absolute":
        return _write_model(folder, {"location": str(sentinel)}), str(sentinel)
    if case == "symlink":
        os.symlink(sentinel, folder / "w.bin")
        return _write_model(folder, {"location": "w.bin"}), "w.bin"
    (folder / "w.bin").write_bytes(_weight().tobytes())
    if case == "past-end":
        return _write_model(folder, {"location": "w.bin", "offset": "4096", "length": str(NBYTES)}), "w.bin"
    if case == "negative-offset":
        return _write_model(folder, {"location": "w.bin", "offset": "-8", "length": str(NBYTES)}), "w.bin"
    if case == "junk-offset":
        return _write_model(folder, {"location": "w.bin", "offset": "0x10"}), "w.bin"
    if case == "wrong-length":
        return _write_model(folder, {"location": "w.bin", "offset": "0", "length": "100"}), "w.bin"
    if case == "missing":
        return _write_model(folder, {"location": "nothing.bin"}), "nothing.bin"
    if case == "no-location":
        return _write_model(folder, {"offset": "0"}), "W"
    raise AssertionError(case)


CASES = ["dotdot", "absolute", "symlink", "past-end", "negative-offset", "junk-offset", "wrong-length", "missing",
         "no-location"]
OUTSIDE = {"dotdot", "absolute", "symlink"}


def _assert_refusal(message: str, case: str, location: str) -> None:
    assert "\n" not in message.strip(), message
    assert "tensor W" in message and location in message, message
    if case in OUTSIDE:
        assert "outside the model's folder" in message, message
    assert "differs from PyTorch" not in message  # nothing was ever computed from the outside bytes


def _reference() -> Reference:
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    return Reference([("random", x, x.reshape(2, -1) @ _weight())])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return _grown_checkpoint(tmp_path_factory.mktemp("ckpt") / "grown.pt", [])


# -- every reader refuses ---------------------------------------------------------------------------

READERS = {
    "check": lambda path: check_external_data(onnx.load(path, load_external_data=False), path),
    "load_onnx": lambda path: load_onnx(path),
    "load_onnx-header": lambda path: load_onnx(path, load_external_data=False),
    "LeanModel.load": LeanModel.load,
    "verify": lambda path: verify_onnx(path, _reference(), stage="verify"),
    "Session": Session,
    "triton-repo": lambda path: write_repository(path.parent.parent / "repo", path, name="m"),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("reader", list(READERS))
def test_library_readers_refuse(tmp_path, sentinel, case, reader):
    path, location = _hostile(case, tmp_path, sentinel)
    with pytest.raises(SurgeonError) as info:
        READERS[reader](path)
    _assert_refusal(str(info.value), case, location)
    assert not (tmp_path / "repo").exists()  # the Triton writer refused before writing anything


@pytest.mark.parametrize("case", sorted(OUTSIDE) + ["past-end"])
def test_cli_verify_and_predict_refuse(tmp_path, sentinel, checkpoint, case):
    path, location = _hostile(case, tmp_path, sentinel)
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (32, 32)).save(image)
    for args in (["verify", path, "--against", checkpoint], ["predict", path, image]):
        res = CliRunner().invoke(cli, [str(a) for a in args])
        assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
        assert res.output.startswith("error: ") and res.output.count("\n") == 1, res.output
        _assert_refusal(res.output, case, location)


@pytest.mark.parametrize("case", sorted(OUTSIDE) + ["past-end"])
def test_build_refuses_and_writes_no_engine(tmp_path, sentinel, case):
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu12 is not installed")
    from surgeon.trt.build import build_engine

    path, location = _hostile(case, tmp_path, sentinel)
    before = sorted(p.name for p in path.parent.iterdir())
    with pytest.raises(SurgeonError) as info:
        build_engine(path, builder="tensorrt-rtx")
    _assert_refusal(str(info.value), case, location)
    res = CliRunner().invoke(cli, ["build", str(path), "--builder", "tensorrt-rtx"])
    assert res.exit_code == 1 and res.output.count("\n") == 1, res.output
    _assert_refusal(res.output, case, location)
    assert sorted(p.name for p in path.parent.iterdir()) == before  # no engine, no sidecar, no temporary copy


# -- legitimate external data still works -----------------------------------------------------------

def _legit(tmp_path: Path, location: str = "w.bin") -> Path:
    folder = tmp_path / "model"
    (folder / Path(location).parent).mkdir(parents=True, exist_ok=True)
    (folder / location).write_bytes(b"\0" * 4096 + _weight().tobytes())
    return _write_model(folder, {"location": location, "offset": "4096", "length": str(NBYTES)})


@pytest.mark.parametrize("location", ["w.bin", "weights/w.bin"])
def test_in_folder_external_data_is_read(tmp_path, location):
    path = _legit(tmp_path, location)
    [tensor] = check_external_data(onnx.load(path, load_external_data=False), path)
    assert (tensor.name, tensor.location, tensor.offset, tensor.length) == ("W", location, 4096, NBYTES)
    assert tensor.file == (path.parent / location).resolve()
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(load_onnx(path).graph.initializer[0]), _weight())
    np.testing.assert_array_equal(LeanModel.load(path).weights["W"], _weight())
    [check] = verify_onnx(path, _reference(), stage="verify")
    assert check.ok
    x = _reference().cases[0][1]
    np.testing.assert_allclose(Session(path).run(x), x.reshape(2, -1) @ _weight(), rtol=1e-4, atol=1e-3)


def test_in_folder_symlink_to_an_in_folder_file_is_fine(tmp_path):
    path = _legit(tmp_path, "real.bin")
    os.symlink("real.bin", path.parent / "w.bin")
    model = onnx.load(path, load_external_data=False)
    model.graph.initializer[0].external_data[0].value = "w.bin"
    path.write_bytes(model.SerializeToString())
    np.testing.assert_array_equal(LeanModel.load(path).weights["W"], _weight())


def test_triton_repo_copies_the_files_the_model_names_and_nothing_else(tmp_path, sentinel):
    path = _legit(tmp_path, "weights/w.bin")
    os.symlink(sentinel, path.parent / "model.onnx.data")  # a stray file the model does not name
    folder, _ = write_repository(tmp_path / "repo", path, name="m")
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert files == ["1/model.onnx", "1/weights/w.bin", "config.pbtxt", "labels.txt"]
    assert (folder / "1" / "weights" / "w.bin").read_bytes() == (path.parent / "weights" / "w.bin").read_bytes()
    np.testing.assert_array_equal(LeanModel.load(folder / "1" / "model.onnx").weights["W"], _weight())


def test_build_reads_in_folder_external_data(tmp_path):
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu12 is not installed")
    from surgeon.trt.build import build_engine

    report = build_engine(_legit(tmp_path), builder="tensorrt-rtx")
    assert Path(report.engine).stat().st_size > 0
