"""`surgeon export --triton-repo`: a model repository tritonserver serves as is, checked with
tritonclient's own ModelConfig protobuf."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from surgeon.cli import cli
from surgeon.export import lean
from surgeon.grow.recipe import GrowStep
from surgeon.runtime.triton_repo import model_name
from tests.export.test_onnx_export import _grown_checkpoint

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient is not installed")
text_format = pytest.importorskip("google.protobuf.text_format")


def _config(path):
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_onnx_repository(tmp_path, precision):
    ckpt = _grown_checkpoint(tmp_path / "flowers" / "grown.pt", [GrowStep("wide", "classifier.0", 16)])
    res = CliRunner().invoke(cli, ["export", str(ckpt), "--batch", "1:4:16", "--precision", precision,
                                   "--triton-repo", str(tmp_path / "repo")])
    assert res.exit_code == 0, res.output
    folder = tmp_path / "repo" / "flowers"
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) == ["1", "1/model.onnx", "config.pbtxt", "labels.txt"]
    cfg = _config(folder / "config.pbtxt")
    assert cfg.name == "flowers" and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 16
    [inp], [out] = cfg.input, cfg.output
    assert inp.name == "images" and inp.data_type == model_config_pb2.TYPE_FP32 and list(inp.dims) == [3, 32, 32]
    assert out.name == "logits" and list(out.dims) == [4] and out.label_filename == "labels.txt"
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 16] and cfg.dynamic_batching.max_queue_delay_microseconds == 500
    assert cfg.instance_group[0].count == 1
    [acc] = cfg.optimization.execution_accelerators.gpu_execution_accelerator
    assert acc.name == "tensorrt" and acc.parameters["precision_mode"] == precision.upper()
    assert (folder / "labels.txt").read_text().splitlines() == ["a", "b", "c", "d"]
    sess = ort.InferenceSession(str(folder / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"images": np.zeros((2, 3, 32, 32), np.float32)})[0].shape == (2, 4)


def test_external_data_is_copied_and_rtx_engines_fall_back_to_onnx(tmp_path, monkeypatch):
    pytest.importorskip("tensorrt_rtx")
    monkeypatch.setattr(lean, "EXTERNAL_DATA_THRESHOLD", 10_000)
    ckpt = _grown_checkpoint(tmp_path / "g.pt", [GrowStep("wide", "classifier.0", 16)])
    res = CliRunner().invoke(cli, ["export", str(ckpt), "--trt", "-o", str(tmp_path / "out" / "m.engine"),
                                   "--triton-repo", str(tmp_path / "repo"), "--triton-name", "my model!"])
    assert res.exit_code == 0, res.output
    assert "TensorRT-RTX, which Triton's TensorRT backend cannot load: serving the ONNX file" in res.output
    folder = tmp_path / "repo" / "my_model"
    assert sorted(p.name for p in (folder / "1").iterdir()) == ["m.onnx.data", "model.onnx"]
    assert _config(folder / "config.pbtxt").platform == "onnxruntime_onnx"
    sess = ort.InferenceSession(str(folder / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"images": np.zeros((1, 3, 32, 32), np.float32)})[0].shape == (1, 4)


def test_model_names():
    assert model_name("runs/wide v2") == "runs_wide_v2" and model_name("ok-name_1") == "ok-name_1"
    with pytest.raises(Exception, match="--triton-name"):
        model_name("///")


def test_engine_config_uses_the_tensorrt_platform_on_gpus(tmp_path):
    from surgeon.preprocessing import Preprocessing
    from surgeon.runtime.artifact import Artifact
    from surgeon.runtime.triton_repo import config_text

    art = Artifact(tmp_path / "m.engine", "engine", ["x", "y", "z"], Preprocessing(input_size=64, resize=72), max_batch=32)
    cfg = text_format.Parse(config_text(art, "m", "tensorrt_plan", max_batch=32, preferred=[8, 32], queue_delay_us=100,
                                        instances=2), model_config_pb2.ModelConfig())
    assert cfg.platform == "tensorrt_plan" and cfg.max_batch_size == 32 and list(cfg.input[0].dims) == [3, 64, 64]
    assert cfg.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU and cfg.instance_group[0].count == 2
    assert not cfg.optimization.HasField("execution_accelerators") and list(cfg.output[0].dims) == [3]


@pytest.mark.parametrize("target, accelerated", [("tensorrt", True), ("ort-cpu", False)])
def test_int8_onnx_config_asks_tensorrt_for_int8_unless_quantized_for_cpus(tmp_path, target, accelerated):
    import json

    from surgeon.preprocessing import Preprocessing
    from surgeon.runtime.artifact import Artifact
    from surgeon.runtime.triton_repo import config_text

    art = Artifact(tmp_path / "m.onnx", "onnx", ["x", "y"], Preprocessing(input_size=32, resize=32), precision="int8",
                   meta={"surgeon.quantization": json.dumps({"target": target})})
    cfg = text_format.Parse(config_text(art, "m", "onnxruntime_onnx", max_batch=8, preferred=[8], queue_delay_us=100,
                                        instances=1), model_config_pb2.ModelConfig())
    assert cfg.optimization.HasField("execution_accelerators") == accelerated
    if accelerated:
        trt = cfg.optimization.execution_accelerators.gpu_execution_accelerator[0]
        assert trt.name == "tensorrt" and trt.parameters["precision_mode"] == "INT8"


@pytest.mark.parametrize("args,message", [
    (["--triton-name", ".."], "cannot make a Triton model name of '..'"),
    (["--triton-name", "///"], "cannot make a Triton model name"),
])
def test_a_bad_triton_name_is_refused_before_anything_is_written(tmp_path, args, message):
    ckpt = _grown_checkpoint(tmp_path / "g.pt", [GrowStep("wide", "classifier.0", 16)])
    out = tmp_path / "out" / "model.onnx"
    res = CliRunner().invoke(cli, ["export", str(ckpt), "-o", str(out), "--triton-repo", str(tmp_path / "repo"), *args])
    assert res.exit_code == 1 and message in res.stderr and res.stderr.count("\n") == 1, res.output
    assert not out.exists() and not (tmp_path / "repo").exists()

