"""Reading ONNX files with one-line errors."""

from __future__ import annotations

from pathlib import Path

import onnx

from surgeon.errors import SurgeonError


def load_onnx(path: str | Path, *, load_external_data: bool = True) -> onnx.ModelProto:
    """The model; ``load_external_data=False`` reads the graph and metadata only (tensors stored in
    ``<name>.data`` files stay on disk)."""
    p = Path(path)
    if not p.exists():
        raise SurgeonError(f"ONNX file {p} does not exist")
    try:
        proto = onnx.load(p, load_external_data=load_external_data)
    except Exception as exc:  # protobuf DecodeError and friends
        raise SurgeonError(f"{p} is not a readable ONNX model ({type(exc).__name__})") from None
    if not proto.graph.node:
        raise SurgeonError(f"{p} is not a readable ONNX model (it has no graph)")
    return proto


def model_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The graph inputs a caller feeds (not initializers that older files also list as inputs)."""
    initializers = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]
