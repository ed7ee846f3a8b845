"""Einsum equations renamed to lowercase labels for TensorRT's parser, exactly (ONNX Runtime check)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from surgeon.trt.einsum import lowercase_equation, needs_lowercase, with_lowercase_einsum


@pytest.mark.parametrize(("equation", "expected"), [
    ("bhid,bhjd->bhij", "bhid,bhjd->bhij"),
    ("BHid,BHjd->BHij", "abid,abjd->abij"),
    ("...Ij,jK->...IK", "...aj,jb->...ab"),
])
def test_lowercase_equation(equation, expected):
    assert lowercase_equation(equation) == expected


def test_more_than_26_letters_are_left_alone():
    eq = "".join(__import__("string").ascii_letters[:27]) + "->"
    assert lowercase_equation(eq) is None


def _model(equation: str) -> onnx.ModelProto:
    node = helper.make_node("Einsum", ["a", "b"], ["y"], equation=equation)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 3, 4]),
                                            helper.make_tensor_value_info("b", TensorProto.FLOAT, [2, 4, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 5])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_the_renamed_model_computes_the_same():
    import onnxruntime as ort

    model = _model("Bij,Bjk->Bik")
    assert needs_lowercase(model) and not needs_lowercase(_model("bij,bjk->bik"))
    renamed = with_lowercase_einsum(model)
    assert not needs_lowercase(renamed) and needs_lowercase(model)  # a copy: the original keeps its equation
    onnx.checker.check_model(renamed)
    rng = np.random.default_rng(0)
    feeds = {"a": rng.standard_normal((2, 3, 4), dtype=np.float32), "b": rng.standard_normal((2, 4, 5), dtype=np.float32)}
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]  # noqa: E731
    np.testing.assert_array_equal(run(renamed), run(model))
