"""A model whose input does not fit its own surgeon image metadata, and one that fails inside ONNX
Runtime: Session.run, predict and verify say so in one line (expected vs given shape), never with
ONNX Runtime's traceback or its raw exception."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from surgeon.cli import cli
from surgeon.errors import SurgeonError
from surgeon.runtime import Session
from tests.export.test_onnx_export import _grown_checkpoint

META = {"surgeon.classes": json.dumps(["a", "b", "c", "d"]), "surgeon.input": "images", "surgeon.output": "logits",
        "surgeon.preprocessing": json.dumps({"input_size": 32, "resize": 32, "mean": [0.5] * 3, "std": [0.5] * 3})}


def _vector_model(path: Path, reshape_to: list[int] | None = None) -> Path:
    """images [N, 10] → MatMul → logits [N, 4], with image metadata (32x32 RGB) that cannot fit it.
    ``reshape_to``: a Reshape after the MatMul that fails at run time (for the runtime-error path)."""
    w = numpy_helper.from_array(np.ones((10, 4), np.float32), "W")
    nodes = [helper.make_node("MatMul", ["images", "W"], ["y" if reshape_to else "logits"])]
    inits = [w]
    if reshape_to:
        inits.append(numpy_helper.from_array(np.array(reshape_to, np.int64), "shape"))
        nodes.append(helper.make_node("Reshape", ["y", "shape"], ["logits"]))
    graph = helper.make_graph(nodes, "vector", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 10])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    helper.set_model_props(model, META)
    path.write_bytes(model.SerializeToString())
    return path


def _one_line(message: str) -> str:
    assert "\n" not in message.strip() and "Traceback" not in message, message
    return message


def test_run_checks_the_declared_input_shape(tmp_path):
    session = Session(_vector_model(tmp_path / "v.onnx"))
    with pytest.raises(SurgeonError) as info:
        session.run(np.zeros((2, 3, 32, 32), np.float32))
    message = _one_line(str(info.value))
    assert "[N, 10]" in message and "[2, 3, 32, 32]" in message, message
    with pytest.raises(SurgeonError, match=r"\[N, 10\].*\[2, 11\]"):
        session.run(np.zeros((2, 11), np.float32))
    # what the model does take runs (the metadata's image size does not overrule the graph)
    np.testing.assert_allclose(session.run(np.ones((2, 10), np.float32)), np.full((2, 4), 10.0))


def test_predict_says_the_metadata_does_not_fit_the_input(tmp_path):
    session = Session(_vector_model(tmp_path / "v.onnx"))
    with pytest.raises(SurgeonError) as info:
        session.predict([np.zeros((32, 32, 3), np.uint8)])
    message = _one_line(str(info.value))
    assert "[N, 10]" in message and "[N, 3, 32, 32]" in message and "metadata" in message, message


def test_runtime_failures_are_surgeon_errors(tmp_path):
    session = Session(_vector_model(tmp_path / "r.onnx", reshape_to=[-1, 3]))  # 2 x 4 values do not reshape to [-1, 3]
    with pytest.raises(SurgeonError) as info:
        session.run(np.ones((2, 10), np.float32))
    message = _one_line(str(info.value))
    assert message.startswith("ONNX Runtime failed to run r.onnx") and "Reshape" in message, message


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return _grown_checkpoint(tmp_path_factory.mktemp("ckpt") / "grown.pt", [])


def test_cli_predict_and_verify_print_one_line(tmp_path, checkpoint):
    model = _vector_model(tmp_path / "v.onnx")
    image = tmp_path / "x.png"
    Image.new("RGB", (40, 40)).save(image)
    res = CliRunner().invoke(cli, ["predict", str(model), str(image)])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
    assert res.output.startswith("error: ") and _one_line(res.output) and "[N, 10]" in res.output, res.output
    res = CliRunner().invoke(cli, ["verify", str(model), "--against", str(checkpoint)])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
    assert res.output.startswith("error: ") and _one_line(res.output), res.output
    assert "[N, 10]" in res.output and "[1, 3, 32, 32]" in res.output and "not written" not in res.output, res.output


def test_library_verify_wraps_runtime_failures(tmp_path):
    from surgeon.export.verify import Reference, verify

    model = _vector_model(tmp_path / "r.onnx", reshape_to=[-1, 3])
    x = np.ones((2, 10), np.float32)
    with pytest.raises(SurgeonError) as info:
        verify(model, Reference([("random", x, np.zeros((2, 4), np.float32))]), stage="verify")
    message = _one_line(str(info.value))
    assert message.startswith("verify: ONNX Runtime failed to run the model on random (batch 2)"), message
