"""TensorRT's ONNX parser takes Einsum equations in lowercase letters only ("Invalid character 'B'
in Einsum equation"); PyTorch's exporter writes what the model wrote (MaxViT's attention uses
capitals). Renaming the equation's letters is exact: an Einsum's labels are names, nothing more.
The ONNX file keeps its equation; only the copy handed to the parser is renamed."""

from __future__ import annotations

import string

import onnx


def _nodes(model: onnx.ModelProto):
    yield from model.graph.node
    for function in model.functions:
        yield from function.node


def _equation(node: onnx.NodeProto) -> onnx.AttributeProto | None:
    if node.op_type != "Einsum" or node.domain not in ("", "ai.onnx"):
        return None
    return next((a for a in node.attribute if a.name == "equation"), None)


def lowercase_equation(equation: str) -> str | None:
    """``equation`` with each capital replaced by a lowercase letter it does not use, or None when
    it uses more than 26 distinct letters (nothing to rename them to)."""
    used = {c for c in equation if c in string.ascii_letters}
    capitals = sorted(c for c in used if c.isupper())
    free = [c for c in string.ascii_lowercase if c not in used]
    if len(capitals) > len(free):
        return None
    return equation.translate(str.maketrans(dict(zip(capitals, free))))


def needs_lowercase(model: onnx.ModelProto) -> bool:
    return any((a := _equation(n)) is not None and any(c.isupper() for c in a.s.decode()) for n in _nodes(model))


def with_lowercase_einsum(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose Einsum equations use lowercase letters only (those that cannot be
    renamed are left for the parser to report)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for node in _nodes(out):
        attr = _equation(node)
        if attr is not None:
            renamed = lowercase_equation(attr.s.decode())
            if renamed is not None:
                attr.s = renamed.encode()
    return out
