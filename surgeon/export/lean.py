"""Models whose large tensors live beside the graph, never inside protobuf, until they are written.

Export, the graph passes, verification and fp16 conversion all work on a :class:`LeanModel`: a
ModelProto in which every large initializer is declared as a typed graph input instead, plus those
tensors as numpy arrays. Graph edits touch only the small proto; the arrays are shared (right after
export they are views of the PyTorch parameters), ONNX Runtime reads them as feeds without copying,
and the writer streams them to disk one at a time. So surgery costs the weights once plus the
tensors a pass rewrites, and protobuf's 2 GB limit matters only for the file: over it, the tensors go
to ``<name>.data`` (ONNX external data).
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from surgeon.errors import SurgeonError
from surgeon.fileio import DirectWriter, atomic_write, fsync_file

SMALL_TENSOR = 4096  # elements; shape vectors and the like stay in the proto, so shape inference reads them
EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # bytes; below protobuf's 2 GiB hard limit, with room for the graph
_ALIGN = 4096  # external-data offsets, so runtimes can map the tensors


def elements(dims: Iterable[int]) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n


def is_weight(dims: Iterable[int]) -> bool:
    """Kept beside the graph (rather than in the proto)."""
    return elements(dims) > SMALL_TENSOR


def _copy_fields(src: Any, dst: Any, skip: str) -> None:
    """Copy every set field of protobuf message ``src`` into ``dst`` except ``skip`` (no deep copy of it)."""
    for field, value in src.ListFields():
        if field.name == skip:
            continue
        target = getattr(dst, field.name)
        if hasattr(target, "extend"):
            target.extend(value)
        elif hasattr(target, "CopyFrom"):
            target.CopyFrom(value)
        else:
            setattr(dst, field.name, value)


@dataclass
class LeanModel:
    proto: onnx.ModelProto          # large initializers are graph inputs named in ``weights``
    weights: dict[str, np.ndarray]  # name → tensor, in the order they are written

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def from_proto(cls, proto: onnx.ModelProto, skip: set[str] = frozenset()) -> LeanModel:  # type: ignore[assignment]
        """Move the large initializers of an in-memory model out (a copy each; ``proto`` is unchanged).
        ``skip``: initializers to declare as inputs without reading them (the caller supplies them)."""
        graph = proto.graph
        weights = {t.name: numpy_helper.to_array(t) for t in graph.initializer if is_weight(t.dims) and t.name not in skip}
        beside = {t.name: (t.data_type, list(t.dims)) for t in graph.initializer if t.name in weights or t.name in skip}
        light = onnx.ModelProto()
        _copy_fields(proto, light, skip="graph")
        _copy_fields(graph, light.graph, skip="initializer")
        light.graph.initializer.extend(t for t in graph.initializer if t.name not in beside)
        declared = {i.name for i in graph.input}
        light.graph.input.extend(helper.make_tensor_value_info(name, elem, dims)
                                 for name, (elem, dims) in beside.items() if name not in declared)
        return cls(light, weights)

    @classmethod
    def load(cls, path: str | Path) -> LeanModel:
        """Read an ONNX file; tensors in external data files are memory-mapped, not read (they cost
        memory only as they are used, and ONNX Runtime takes the mapped arrays as feeds). Only the
        files and byte ranges that :func:`~surgeon.export.onnx_io.check_external_data` allowed are mapped."""
        from surgeon.export.onnx_io import check_external_data, load_onnx

        path = Path(path)
        header = load_onnx(path, load_external_data=False)
        checked = {t.name: t for t in check_external_data(header, path)}
        mapped: dict[str, np.ndarray] = {}
        for t in header.graph.initializer:
            if t.data_location != onnx.TensorProto.EXTERNAL:
                continue
            where = checked[t.name]
            dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
            try:
                mapped[t.name] = np.memmap(where.file, dtype=dtype.newbyteorder("<"), mode="r",
                                           offset=where.offset, shape=tuple(t.dims))
            except (OSError, ValueError) as exc:
                raise SurgeonError(f"{path}: cannot map the external data of tensor {t.name} ({exc})") from None
        if not mapped:
            return cls.from_proto(load_onnx(path))
        for t in header.graph.initializer:  # external ones: drop the references, keep the metadata shape
            if t.name in mapped:
                t.data_location = onnx.TensorProto.DEFAULT
                del t.external_data[:]
        lean = cls.from_proto(header, skip=set(mapped))
        lean.weights.update(mapped)
        return lean

    @classmethod
    def from_ir(cls, model: Any) -> LeanModel:
        """From an ``onnx_ir.Model`` (what ``torch.onnx.export`` builds): its large initializers become
        inputs and their arrays are taken as they are — views of the PyTorch parameters, no copy."""
        import onnx_ir as ir

        graph = model.graph
        weights: dict[str, np.ndarray] = {}
        for name, value in list(graph.initializers.items()):
            tensor = value.const_value
            if tensor is None or not is_weight(tensor.shape) or value in graph.inputs:
                continue
            weights[name] = tensor.numpy()
            graph.initializers.pop(name)
            value.const_value = None
            value.type, value.shape = ir.TensorType(tensor.dtype), ir.Shape(tensor.shape)
            graph.inputs.append(value)
        return cls(ir.serde.serialize_model(model), weights)

    # -- facts ---------------------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        return self.proto.ByteSize() + sum(a.nbytes for a in self.weights.values())

    def is_large(self) -> bool:
        """Too big for one protobuf file: written with external data."""
        return self.nbytes > EXTERNAL_DATA_THRESHOLD

    @property
    def inputs(self) -> list[onnx.ValueInfoProto]:
        """The model's own inputs (not the weights declared as inputs)."""
        return [i for i in self.proto.graph.input if i.name not in self.weights]

    def feeds(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        """ONNX Runtime feeds: the given inputs plus every weight (ONNX Runtime wraps them, no copy)."""
        return {**self.weights, **inputs}

    # -- whole models --------------------------------------------------------------------------

    def _head(self) -> onnx.ModelProto:
        """The proto without the weight inputs: what is written before the tensors."""
        head = onnx.ModelProto()
        _copy_fields(self.proto, head, skip="graph")
        _copy_fields(self.proto.graph, head.graph, skip="input")
        head.graph.input.extend(i for i in self.proto.graph.input if i.name not in self.weights)
        return head

    def to_proto(self) -> onnx.ModelProto:
        """An ordinary in-memory ModelProto (a copy of every tensor; for small models)."""
        proto = self._head()
        proto.graph.initializer.extend(numpy_helper.from_array(a, name) for name, a in self.weights.items())
        return proto

    def check(self) -> None:
        """onnx.checker on the graph (the weights are declared inputs: no tensor is serialized)."""
        onnx.checker.check_model(self.proto)

    def infer_shapes(self) -> onnx.ModelProto:
        """The proto with inferred value_info (a copy of the small proto)."""
        return onnx.shape_inference.infer_shapes(self.proto, data_prop=True)

    def save(self, path: str | Path, *, direct: bool = True) -> list[Path]:
        """Write atomically and durably, streaming the tensors; over the protobuf limit the tensors go
        to ``<path>.data``. The tensors bypass the page cache where the filesystem allows
        (:class:`~surgeon.fileio.DirectWriter`); ``direct=False`` for a file that is read back at once.
        Returns the files written."""
        path = Path(path)
        if not self.is_large():
            return [atomic_write(path, lambda tmp: self._write_single(Path(tmp), direct))]
        # Two files, both written in a private folder beside the target and renamed into place,
        # the data first (the model file names it).
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        except OSError as exc:
            raise SurgeonError(f"cannot write {path}: {exc.strerror or exc}") from None
        data_name = f"{path.name}.data"
        try:
            self._write_external(tmpdir / path.name, data_name, direct)
            for written in (tmpdir / data_name, tmpdir / path.name):  # on the disk before either is renamed
                fsync_file(written)
            os.replace(tmpdir / data_name, path.parent / data_name)
            os.replace(tmpdir / path.name, path)
            return [path, path.parent / data_name]
        except OSError as exc:
            raise SurgeonError(f"cannot write {path}: {exc.strerror or exc}") from None
        finally:
            for leftover in tmpdir.iterdir():
                leftover.unlink()
            tmpdir.rmdir()

    def _write_single(self, path: Path, direct: bool = True) -> None:
        """One protobuf file: the head, then each tensor as its own ``graph { initializer {...} }``
        record. Protobuf merges repeated occurrences of a message field, so readers see one graph
        whose initializers are the head's plus these — and no tensor is ever copied whole."""
        with DirectWriter(path, direct=direct) as f:  # atomic_write fsyncs after
            f.write(self._head().SerializeToString())
            for name, array in self.weights.items():
                _write_initializer_record(f, name, array)

    def _write_external(self, path: Path, data_name: str, direct: bool = True) -> None:
        head = self._head()
        offset = 0
        with DirectWriter(path.parent / data_name, direct=direct) as data:
            for name, array in self.weights.items():
                array = _little_endian(array)
                pad = -offset % _ALIGN
                data.write(b"\0" * pad)
                offset += pad
                tensor = head.graph.initializer.add()
                tensor.name, tensor.data_type = name, helper.np_dtype_to_tensor_dtype(array.dtype)
                tensor.dims.extend(array.shape)
                tensor.data_location = onnx.TensorProto.EXTERNAL
                for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(array.nbytes))):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = key, value
                data.write(_raw(array))
                offset += array.nbytes
        with open(path, "wb") as f:
            f.write(head.SerializeToString())


# -- protobuf framing for _write_single -----------------------------------------------------------

_MODEL_GRAPH = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
_GRAPH_INITIALIZER = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
_TENSOR_RAW_DATA = onnx.TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _key(field: int) -> bytes:
    return _varint(field << 3 | 2)  # wire type 2: length-delimited


def _little_endian(array: np.ndarray) -> np.ndarray:
    """ONNX raw data is little-endian and C-ordered (a copy only where the array is not already)."""
    if array.dtype.byteorder == ">" or (array.dtype.byteorder == "=" and sys.byteorder == "big"):
        array = array.astype(array.dtype.newbyteorder("<"))
    return np.ascontiguousarray(array)


def _raw(array: np.ndarray) -> memoryview:
    return memoryview(array.reshape(-1).view(np.uint8))


def _write_initializer_record(f: DirectWriter | IO[bytes], name: str, array: np.ndarray) -> None:
    array = _little_endian(array)
    meta = onnx.TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape)
    meta_bytes = meta.SerializeToString()
    raw_header = _key(_TENSOR_RAW_DATA) + _varint(array.nbytes)
    tensor_len = len(meta_bytes) + len(raw_header) + array.nbytes
    graph_body = _key(_GRAPH_INITIALIZER) + _varint(tensor_len)
    f.write(_key(_MODEL_GRAPH) + _varint(len(graph_body) + tensor_len) + graph_body + meta_bytes + raw_header)
    f.write(_raw(array))
