"""A Triton Inference Server model repository for one exported model, served as is by ``tritonserver``.

    DIR/<name>/config.pbtxt      platform, max_batch_size, typed inputs/outputs, dynamic batching
    DIR/<name>/labels.txt        one class per line (the output's label file: classification results)
    DIR/<name>/1/model.onnx      (+ the external data files it names), or 1/model.plan for a TensorRT engine

ONNX models use the ``onnxruntime_onnx`` platform with ONNX Runtime's TensorRT accelerator
(precision from the graph); engines use ``tensorrt_plan``. An engine built by TensorRT-RTX cannot be
served by Triton's TensorRT backend, so the ONNX file is used instead. Every file is written
atomically. Only the external data files the model names are copied, once their locations are checked
to lie inside the model's folder (a stray ``model.onnx.data`` beside it, or a link out, is not).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from surgeon.errors import SurgeonError
from surgeon.fileio import atomic_write, atomic_write_text
from surgeon.runtime.artifact import Artifact, read_artifact


def model_name(text: str) -> str:
    """A Triton model name: letters, digits, ``_`` and ``-``."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")
    if not name:
        raise SurgeonError(f"cannot make a Triton model name of {text!r}: pass --triton-name")
    return name


def config_text(art: Artifact, name: str, platform: str, *, max_batch: int, preferred: list[int],
                queue_delay_us: int, instances: int) -> str:
    """config.pbtxt (protobuf text format of Triton's ModelConfig)."""
    c, h, w = art.input_shape
    classes = len(art.classes)
    if classes < 1:
        raise SurgeonError(f"{art.path.name} does not say how many classes it has")
    lines = [
        f'name: "{name}"',
        f'platform: "{platform}"',
        f"max_batch_size: {max_batch}",
        "input [",
        "  {",
        f'    name: "{art.input_name}"',
        "    data_type: TYPE_FP32",
        f"    dims: [ {c}, {h}, {w} ]",
        "  }",
        "]",
        "output [",
        "  {",
        f'    name: "{art.output_name}"',
        "    data_type: TYPE_FP32",
        f"    dims: [ {classes} ]",
        '    label_filename: "labels.txt"',
        "  }",
        "]",
        "dynamic_batching {",
        f"  preferred_batch_size: [ {', '.join(str(b) for b in preferred)} ]",
        f"  max_queue_delay_microseconds: {queue_delay_us}",
        "}",
        "instance_group [",
        "  {",
        f"    count: {instances}",
    ]
    if platform == "tensorrt_plan":
        lines.append("    kind: KIND_GPU")
    lines += ["  }", "]"]
    # ONNX Runtime's TensorRT accelerator builds at the graph's precision (INT8: the Q/DQ scales of
    # the file); an int8 file quantized for ONNX Runtime on CPUs (uint8 zero points) is not for
    # TensorRT, so it gets no accelerator.
    from surgeon.export.onnx_io import quantization_target

    cpu_int8 = art.precision == "int8" and quantization_target(art.meta) == "ort-cpu"
    if platform == "onnxruntime_onnx" and not cpu_int8:
        precision = {"fp16": "FP16", "int8": "INT8"}.get(art.precision, "FP32")
        lines += [
            "optimization {",
            "  execution_accelerators {",
            "    gpu_execution_accelerator: [",
            "      {",
            '        name: "tensorrt"',
            f'        parameters {{ key: "precision_mode" value: "{precision}" }}',
            '        parameters { key: "max_workspace_size_bytes" value: "1073741824" }',
            "      }",
            "    ]",
            "  }",
            "}",
        ]
    return "\n".join(lines) + "\n"


def _copy(src: Path, dst: Path) -> None:
    atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))


def write_repository(repo: str | Path, onnx_path: str | Path, *, engine: str | Path | None = None, name: str,
                     queue_delay_us: int = 500, instances: int = 1) -> tuple[Path, str]:
    """Write ``repo/<name>/``; returns (the model folder, a note on what is served)."""
    onnx_path = Path(onnx_path)
    art = read_artifact(engine) if engine else read_artifact(onnx_path)
    note = ""
    if art.kind == "engine" and art.meta.get("surgeon.ahead_of_time") == "True":
        note = "the engine was built by TensorRT-RTX, which Triton's TensorRT backend cannot load: serving the ONNX file"
        art = read_artifact(onnx_path)
    batch = art.meta.get("surgeon.batch", "1:8:64").split(":")
    max_batch = art.max_batch
    preferred = sorted({int(batch[1]), max_batch}) if len(batch) == 3 else [max_batch]
    folder = Path(repo) / model_name(name)
    platform = "tensorrt_plan" if art.kind == "engine" else "onnxruntime_onnx"
    if art.kind == "engine":
        _copy(art.path, folder / "1" / "model.plan")
    else:
        _copy(art.path, folder / "1" / "model.onnx")
        for location in art.data_files:  # relative, without "..", resolved inside the folder: read_artifact checked
            _copy(art.path.parent / location, folder / "1" / location)
    atomic_write_text(folder / "labels.txt", "".join(f"{c}\n" for c in art.classes))
    atomic_write_text(folder / "config.pbtxt", config_text(art, folder.name, platform, max_batch=max_batch,
                                                           preferred=preferred, queue_delay_us=queue_delay_us,
                                                           instances=instances))
    return folder, note
