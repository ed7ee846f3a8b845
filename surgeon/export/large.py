"""Models over protobuf's 2 GB limit: external data, and the checks that must not serialize them.

A ModelProto can hold more than 2 GB in memory but cannot be serialized whole, so for large models
(a) files are written with their tensors in ``<name>.data`` next to them, (b) ONNX Runtime loads
them from such a file, and (c) shape inference and the checker run on a *weightless* copy: the
same graph with each initializer declared as a typed input, which costs no tensor memory.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx

from surgeon.errors import SurgeonError
from surgeon.fileio import atomic_write

# Below protobuf's 2 GiB hard limit, with room for the graph itself.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def is_large(proto: onnx.ModelProto) -> bool:
    return proto.ByteSize() > EXTERNAL_DATA_THRESHOLD


SMALL_TENSOR = 4096  # elements; shape vectors and the like stay, so shape inference can read them


def weightless(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its large initializers replaced by typed graph inputs (same names, shapes,
    types); small ones (e.g. Reshape targets) are kept so data-dependent shapes still infer."""
    graph = proto.graph
    declared = {i.name for i in graph.input}
    small = [init for init in graph.initializer if _elements(init) <= SMALL_TENSOR]
    inputs = list(graph.input) + [
        onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims))
        for init in graph.initializer if _elements(init) > SMALL_TENSOR and init.name not in declared
    ]
    light = onnx.helper.make_graph(list(graph.node), graph.name, inputs, list(graph.output), initializer=small,
                                   value_info=list(graph.value_info))
    model = onnx.helper.make_model(light, opset_imports=list(proto.opset_import), functions=list(proto.functions),
                                   ir_version=proto.ir_version)
    return model


def _elements(init: onnx.TensorProto) -> int:
    n = 1
    for d in init.dims:
        n *= d
    return n


def infer_shapes(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``onnx.shape_inference`` for any size, in place: the value_info comes from the weightless
    copy, so no tensor is copied (onnx's own inference serializes the whole model)."""
    inferred = onnx.shape_inference.infer_shapes(weightless(proto), data_prop=True)
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(inferred.graph.value_info)
    for declared, found in zip(proto.graph.output, inferred.graph.output):  # inference fills output types too
        declared.CopyFrom(found)
    return proto


def check(proto: onnx.ModelProto) -> None:
    onnx.checker.check_model(weightless(proto) if is_large(proto) else proto)


def save(proto: onnx.ModelProto, path: str | Path) -> list[Path]:
    """Write ``proto`` to ``path`` atomically; a large model's tensors go to ``path.data``.
    Returns the files written. The proto itself is not modified."""
    path = Path(path)
    if not is_large(proto):
        return [atomic_write(path, lambda tmp: onnx.save(proto, tmp))]
    # Two files: both are written in a private folder beside the target, then renamed into place,
    # the data first (the model file points to it by name).
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    except OSError as exc:
        raise SurgeonError(f"cannot write {path}: {exc.strerror or exc}") from None
    data_name = f"{path.name}.data"
    try:
        _save_external(proto, tmpdir / path.name, data_name)
        os.replace(tmpdir / data_name, path.parent / data_name)
        os.replace(tmpdir / path.name, path)
        return [path, path.parent / data_name]
    except OSError as exc:
        raise SurgeonError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        for leftover in tmpdir.iterdir():
            leftover.unlink()
        tmpdir.rmdir()


def _save_external(proto: onnx.ModelProto, path: Path, data_name: str) -> None:
    """onnx.save with external data moves the tensor bytes out of the proto it writes; read them
    back afterwards so the caller's proto is unchanged (disk I/O instead of a second copy in memory)."""
    from onnx.external_data_helper import load_external_data_for_model

    onnx.save_model(proto, path, save_as_external_data=True, all_tensors_to_one_file=True, location=data_name,
                    size_threshold=1024)
    load_external_data_for_model(proto, str(path.parent))
    for init in proto.graph.initializer:  # back to ordinary in-memory tensors
        init.data_location = onnx.TensorProto.DEFAULT
        del init.external_data[:]


def session_source(proto: onnx.ModelProto, workdir: Path) -> str | bytes:
    """What ONNX Runtime should load: the bytes, or for a large model a file with external data."""
    if not is_large(proto):
        return proto.SerializeToString()
    target = workdir / "model.onnx"
    _save_external(proto, target, "model.onnx.data")
    return str(target)
