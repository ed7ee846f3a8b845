"""What a model file says about itself: kind, classes, preprocessing, input/output names, precision.

ONNX files carry it in ``metadata_props`` (``surgeon.*``), engines in the ``<engine>.json`` sidecar
that ``surgeon build`` writes, checkpoints in themselves. A foreign ONNX file without surgeon's
metadata still works: ImageNet preprocessing at its input size, classes numbered.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from surgeon.errors import SurgeonError
from surgeon.preprocessing import Preprocessing

ENGINE_SUFFIXES = (".engine", ".plan")


@dataclass(frozen=True)
class Artifact:
    path: Path
    kind: str                       # "onnx" | "engine" | "checkpoint"
    classes: list[str]
    preprocessing: Preprocessing
    input_name: str = "images"
    output_name: str = "logits"
    precision: str = "fp32"
    max_batch: int = 64
    meta: dict[str, str] = field(default_factory=dict)
    input_dims: tuple[int | None, ...] | None = None  # the model's declared input (None: dynamic); None if unknown
    data_files: tuple[str, ...] = ()                  # its external data files, relative to its folder (checked)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """One preprocessed image, as the preprocessing metadata makes it."""
        size = self.preprocessing.input_size
        return (3, size, size)


def _batch_max(meta: dict[str, str]) -> int:
    try:
        return int(meta["surgeon.batch"].split(":")[2])
    except (KeyError, IndexError, ValueError):
        return 64


def _from_meta(path: Path, kind: str, meta: dict[str, str], fallback_size: int | None, outputs: int | None,
               input_name: str, output_name: str) -> Artifact:
    if "surgeon.preprocessing" in meta:
        pre = Preprocessing.from_dict(json.loads(meta["surgeon.preprocessing"]))
    elif fallback_size:
        pre = Preprocessing(input_size=fallback_size, resize=round(fallback_size * 256 / 224))
    else:
        raise SurgeonError(f"{path} has no surgeon metadata and no static input size: cannot tell how to preprocess images")
    if "surgeon.classes" in meta:
        classes = [str(c) for c in json.loads(meta["surgeon.classes"])]
    elif outputs:
        classes = [str(i) for i in range(outputs)]
    else:
        classes = []
    return Artifact(path, kind, classes, pre, meta.get("surgeon.input", input_name), meta.get("surgeon.output", output_name),
                    meta.get("surgeon.precision", "fp32"), _batch_max(meta), meta)


def read_artifact(path: str | Path) -> Artifact:
    p = Path(path)
    if not p.exists():
        raise SurgeonError(f"model {p} does not exist")
    if p.is_dir():
        raise SurgeonError(f"{p} is a directory, not a model file")
    suffix = p.suffix.lower()
    if suffix == ".onnx":
        from surgeon.export.onnx_io import check_external_data, declared_dims, load_onnx, model_inputs

        header = load_onnx(p, load_external_data=False)  # refuses external data outside the model's folder
        data_files = tuple(dict.fromkeys(t.location for t in check_external_data(header, p)))
        inputs = model_inputs(header)
        dims = inputs[0].type.tensor_type.shape.dim if inputs else []
        size = dims[-1].dim_value if len(dims) == 4 and dims[-1].HasField("dim_value") else None
        out_dims = header.graph.output[0].type.tensor_type.shape.dim if header.graph.output else []
        outputs = out_dims[-1].dim_value if out_dims and out_dims[-1].HasField("dim_value") else None
        meta = {m.key: m.value for m in header.metadata_props}
        art = _from_meta(p, "onnx", meta, size, outputs, inputs[0].name if inputs else "images",
                         header.graph.output[0].name if header.graph.output else "logits")
        # The graph, not its metadata, says what ONNX Runtime must be fed.
        graph_input = {"input_name": inputs[0].name, "input_dims": declared_dims(inputs[0])} if inputs else {}
        return replace(art, **graph_input, data_files=data_files)
    if suffix in ENGINE_SUFFIXES:
        from surgeon.trt.build import engine_sidecar

        sidecar = engine_sidecar(p)
        if not sidecar.is_file():
            raise SurgeonError(f"{p} has no {sidecar.name} beside it (classes and preprocessing): build it with `surgeon build`")
        try:
            data = json.loads(sidecar.read_text())
            meta, build = dict(data["metadata"]), dict(data.get("build", {}))
        except (ValueError, KeyError, TypeError) as exc:
            raise SurgeonError(f"{sidecar} is not a surgeon engine description ({type(exc).__name__})") from None
        shape = build.get("input_shape") or []
        art = _from_meta(p, "engine", meta, shape[-1] if len(shape) == 4 else None, None,
                         build.get("input", "images"), meta.get("surgeon.output", "logits"))
        if shape and all(isinstance(d, int) for d in shape):
            art = replace(art, input_dims=tuple(d if d > 0 else None for d in shape))
        batch = str(build.get("batch", ""))
        if batch.count(":") == 2:
            art = Artifact(**{**art.__dict__, "max_batch": int(batch.split(":")[2]),
                              "meta": {**meta, "surgeon.builder": str(build.get("builder", "")),
                                       "surgeon.ahead_of_time": str(bool(build.get("ahead_of_time")))}})
        return art
    from surgeon.runtime.backends.torch_eager import read_checkpoint_info  # the one runtime module that imports torch

    classes, pre, base_model = read_checkpoint_info(p)
    return Artifact(p, "checkpoint", classes, pre, meta={"surgeon.base_model": base_model})
