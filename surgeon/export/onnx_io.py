"""Reading ONNX files with one-line errors, and the one check of their external data.

Every surgeon reader of a user's ONNX file (export's verification, ``surgeon verify``, runtime
sessions, engine builds, the Triton repository writer) opens it through :func:`load_onnx`, which
refuses external data that would make a reader — surgeon itself, ONNX Runtime or TensorRT's parser —
open a file outside the model's folder or read past the end of one. A model file is untrusted input:
its tensors may name any path.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import helper
from onnx.external_data_helper import ExternalDataInfo, load_external_data_for_model, uses_external_data

from surgeon.errors import SurgeonError, first_line

# Elements per byte of the packed types (their numpy stand-ins take a byte per element).
_SUB_BYTE_BITS = {getattr(onnx.TensorProto, name): bits for name, bits in
                  (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2))
                  if hasattr(onnx.TensorProto, name)}


@dataclass(frozen=True)
class ExternalTensor:
    """One tensor's checked external data: ``length`` bytes at ``offset`` of ``file``."""

    name: str
    location: str   # as the model writes it, relative to the model's folder
    file: Path      # resolved, inside the model's folder
    offset: int
    length: int


def load_onnx(path: str | Path, *, load_external_data: bool = True) -> onnx.ModelProto:
    """The model, its external data checked (see :func:`check_external_data`) before anything reads it;
    ``load_external_data=False`` reads the graph and metadata only (the tensors stay on disk)."""
    p = Path(path)
    if not p.exists():
        raise SurgeonError(f"ONNX file {p} does not exist")
    try:
        proto = onnx.load(p, load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        raise SurgeonError(f"{p} is not a readable ONNX model ({type(exc).__name__})") from None
    if not proto.graph.node:
        raise SurgeonError(f"{p} is not a readable ONNX model (it has no graph)")
    external = check_external_data(proto, p)
    if load_external_data and external:
        try:
            load_external_data_for_model(proto, str(p.parent))
        except (OSError, ValueError) as exc:  # the file changed since the check
            raise SurgeonError(f"{p}: cannot read its external data ({exc})") from None
    return proto


def check_external_data(model: onnx.ModelProto, model_path: str | Path) -> list[ExternalTensor]:
    """Every external-data reference of ``model`` (read from ``model_path``), checked: a relative
    location without ``..`` that resolves (symbolic links followed) to a regular file inside the
    model's folder, a non-negative integer offset and length, a length equal to the tensor's declared
    size, and ``offset + length`` within the file. Raises a one-line SurgeonError naming the tensor
    and its location otherwise."""
    folder = Path(model_path).parent.resolve()
    return [_check_tensor(tensor, folder) for tensor in _tensors(model) if uses_external_data(tensor)]


def _check_tensor(tensor: onnx.TensorProto, folder: Path) -> ExternalTensor:
    location = next((e.value for e in tensor.external_data if e.key == "location"), "")
    where = f"location {location!r}"

    def refuse(why: str) -> SurgeonError:
        return SurgeonError(f"tensor {tensor.name}'s external data {why}: refusing to read the model "
                            f"(external data must lie within files inside the model's folder {folder})")

    if not location:
        raise refuse("names no location")
    try:
        info = ExternalDataInfo(tensor)  # onnx's own parsing: integer, non-negative offset and length
    except ValueError as exc:
        raise refuse(f"at {where} has a bad offset or length ({first_line(exc)[:200]})") from None
    if os.path.isabs(location) or location.startswith(("/", "\\")):
        raise refuse(f"{where} is an absolute path, outside the model's folder")
    if ".." in Path(location.replace("\\", "/")).parts:
        raise refuse(f"{where} climbs out with '..', outside the model's folder")
    try:
        file = (folder / location).resolve()
    except (OSError, ValueError, RuntimeError) as exc:  # NUL bytes, symlink loops
        raise refuse(f"{where} cannot be resolved ({exc})") from None
    if not file.is_relative_to(folder):
        raise refuse(f"{where} is a symbolic link to {file}, outside the model's folder")
    if not file.exists():
        raise refuse(f"{where} does not exist in the model's folder")
    if not file.is_file():
        raise refuse(f"{where} is not a regular file")
    size = file.stat().st_size
    declared = _declared_bytes(tensor, refuse)
    offset = info.offset or 0
    length = declared if info.length is None else info.length
    if length != declared:
        raise refuse(f"at {where} gives length {length}, but the tensor's type and shape take {declared} bytes")
    if offset + length > size:
        raise refuse(f"at {where} ends at byte {offset + length}, past the end of the {size}-byte file")
    return ExternalTensor(tensor.name, location, file, offset, length)


def _declared_bytes(tensor: onnx.TensorProto, refuse) -> int:
    """Bytes that the tensor's type and dims take (sub-byte types packed)."""
    if any(d < 0 for d in tensor.dims):
        raise refuse(f"belongs to a tensor with negative dims {list(tensor.dims)}")
    count = 1
    for d in tensor.dims:
        count *= d
    if tensor.data_type in _SUB_BYTE_BITS:
        return (count * _SUB_BYTE_BITS[tensor.data_type] + 7) // 8
    try:
        itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        itemsize = 0
    if tensor.data_type == onnx.TensorProto.STRING or itemsize == 0:
        raise refuse(f"belongs to a tensor of type {tensor.data_type}, which cannot be stored externally")
    return count * itemsize


def _tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor a reader may load: initializers (sparse ones too) and node attributes, in the
    main graph, its subgraphs and the model's functions."""
    def in_graph(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield from (sparse.values, sparse.indices)
        yield from in_nodes(graph.node)

    def in_nodes(nodes) -> Iterator[onnx.TensorProto]:
        for node in nodes:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                if attr.HasField("sparse_tensor"):
                    yield from (attr.sparse_tensor.values, attr.sparse_tensor.indices)
                for sparse in attr.sparse_tensors:
                    yield from (sparse.values, sparse.indices)
                if attr.HasField("g"):
                    yield from in_graph(attr.g)
                for graph in attr.graphs:
                    yield from in_graph(graph)

    yield from in_graph(model.graph)
    for function in model.functions:
        yield from in_nodes(function.node)


def set_metadata(proto: onnx.ModelProto, props: dict[str, str]) -> None:
    """Set ``metadata_props`` entries (replacing those of the same keys, keeping the others in order)."""
    keep = [(p.key, p.value) for p in proto.metadata_props if p.key not in props]
    del proto.metadata_props[:]
    for key, value in [*keep, *props.items()]:
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def quantization_target(meta: dict[str, str]) -> str | None:
    """Who an int8 file was quantized for (``surgeon quantize --target``), from its metadata; None
    for a file surgeon did not quantize."""
    import json

    try:
        return json.loads(meta.get("surgeon.quantization", "{}")).get("target")
    except (ValueError, AttributeError):
        return None


def model_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The graph inputs a caller feeds (not initializers that older files also list as inputs)."""
    initializers = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def declared_dims(value: onnx.ValueInfoProto) -> tuple[int | None, ...] | None:
    """An input's dims (None where dynamic), or None when it declares no shape."""
    tensor = value.type.tensor_type
    if not tensor.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim)


def show_shape(dims: tuple[int | None, ...] | list[int | None]) -> str:
    """``[N, 3, 32, 32]``: a dynamic first dim shows as N (the batch), other dynamic dims as ?."""
    return "[" + ", ".join("N" if i == 0 and d is None else "?" if d is None else str(d) for i, d in enumerate(dims)) + "]"
