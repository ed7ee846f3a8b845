"""LeanModel: weights beside the graph. Files it streams load as ordinary ONNX (one file, or with
external data over the threshold), ONNX Runtime runs it with the weights as feeds, export shares the
PyTorch parameters, and the pass manager frees the tensors a pass replaces."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from surgeon.checkpoint import read_checkpoint
from surgeon.errors import SurgeonError
from surgeon.export import lean as lean_mod
from surgeon.export.lean import SMALL_TENSOR, LeanModel
from surgeon.export.onnx_export import to_onnx
from surgeon.export.passes.base import PassManager
from surgeon.export.passes.merge_parallel import merge_parallel
from surgeon.export.verify import OrtRunner
from surgeon.grow.recipe import GrowStep
from tests.export.test_onnx_export import _grown_checkpoint

RNG = np.random.default_rng(0)


def _mlp(dtype=np.float32) -> onnx.ModelProto:
    """x → MatMul W1 → Reshape (small shape constant) → Gemm W2 (+bias): two large, two small tensors."""
    w1 = RNG.normal(size=(64, 96)).astype(dtype)
    w2 = RNG.normal(size=(48, 96)).astype(dtype)
    b2 = RNG.normal(size=(48,)).astype(dtype)
    shape = np.array([-1, 96], np.int64)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm"),
             helper.make_node("Reshape", ["h", "shape"], ["r"], name="rs"),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", elem, ["N", 64])],
                              [helper.make_tensor_value_info("y", elem, ["N", 48])],
                              [numpy_helper.from_array(a, n) for n, a in (("w1", w1), ("shape", shape), ("w2", w2), ("b2", b2))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="test_lean")
    model.ir_version = 10
    helper.set_model_props(model, {"k": "v"})
    return model


def _run(source, feeds):
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_from_proto_moves_only_large_tensors_out():
    model = _mlp()
    lean = LeanModel.from_proto(model)
    assert set(lean.weights) == {"w1", "w2"} and all(a.size > SMALL_TENSOR for a in lean.weights.values())
    assert {i.name for i in lean.proto.graph.initializer} == {"shape", "b2"}
    assert [i.name for i in lean.inputs] == ["x"]
    assert {i.name for i in lean.proto.graph.input} == {"x", "w1", "w2"}
    assert len(model.graph.initializer) == 4  # the source is unchanged
    x = RNG.normal(size=(3, 64)).astype(np.float32)
    np.testing.assert_array_equal(_run(lean.proto.SerializeToString(), lean.feeds(x=x)),
                                  _run(model.SerializeToString(), {"x": x}))
    lean.check()


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_streamed_single_file_loads_as_the_same_model(tmp_path, dtype):
    model = _mlp(dtype)
    lean = LeanModel.from_proto(model)
    [path] = lean.save(tmp_path / "m.onnx")
    loaded = onnx.load(path)
    onnx.checker.check_model(loaded, full_check=True)
    assert {t.name: numpy_helper.to_array(t).tobytes() for t in loaded.graph.initializer} == \
        {t.name: numpy_helper.to_array(t).tobytes() for t in model.graph.initializer}
    assert [i.name for i in loaded.graph.input] == ["x"]
    assert {p.key: p.value for p in loaded.metadata_props} == {"k": "v"}
    assert [n.name for n in loaded.graph.node] == ["mm", "rs", "fc"]
    x = RNG.normal(size=(2, 64)).astype(dtype)
    np.testing.assert_array_equal(_run(str(path), {"x": x}), _run(model.SerializeToString(), {"x": x}))
    # to_proto: the same model in memory
    assert lean.to_proto().SerializeToString() == loaded.SerializeToString()


def test_external_data_over_the_threshold(tmp_path, monkeypatch):
    monkeypatch.setattr(lean_mod, "EXTERNAL_DATA_THRESHOLD", 1000)
    model = _mlp()
    lean = LeanModel.from_proto(model)
    assert lean.is_large()
    paths = lean.save(tmp_path / "m.onnx")
    assert [p.name for p in paths] == ["m.onnx", "m.onnx.data"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]  # no temp folder left
    header = onnx.load(paths[0], load_external_data=False)
    external = {t.name: {e.key: e.value for e in t.external_data} for t in header.graph.initializer
                if t.data_location == TensorProto.EXTERNAL}
    assert set(external) == {"w1", "w2"}
    assert all(int(e["offset"]) % 4096 == 0 for e in external.values())
    x = RNG.normal(size=(2, 64)).astype(np.float32)
    np.testing.assert_array_equal(_run(str(paths[0]), {"x": x}), _run(model.SerializeToString(), {"x": x}))
    assert numpy_helper.to_array(next(t for t in onnx.load(paths[0]).graph.initializer if t.name == "w2")).tobytes() == \
        lean.weights["w2"].tobytes()


@pytest.mark.parametrize("large", [False, True])
def test_direct_and_page_cache_writes_give_the_same_files(tmp_path, monkeypatch, large):
    """save() bypasses the page cache where it can (DirectWriter); the bytes are those of an ordinary write."""
    if large:
        monkeypatch.setattr(lean_mod, "EXTERNAL_DATA_THRESHOLD", 1000)
    lean = LeanModel.from_proto(_mlp())
    direct = lean.save(tmp_path / "direct" / "m.onnx")
    cached = lean.save(tmp_path / "cached" / "m.onnx", direct=False)
    assert [p.name for p in direct] == [p.name for p in cached] == (["m.onnx", "m.onnx.data"] if large else ["m.onnx"])
    for a, b in zip(direct, cached):
        assert a.read_bytes() == b.read_bytes()


def test_save_to_an_unwritable_place_leaves_nothing(tmp_path):
    lean = LeanModel.from_proto(_mlp())
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(Exception, match="cannot write"):
        lean.save(blocker / "m.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_export_shares_the_pytorch_parameters():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)).eval()
    lean = to_onnx(model, 16)
    [name] = lean.weights  # the 768x64 weight; the 64x10 one is small and stays in the proto
    assert np.shares_memory(lean.weights[name], model[1].weight.detach().numpy())
    x = torch.randn(3, 3, 16, 16)
    got = OrtRunner(lean).run(x.numpy())
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), rtol=1e-5, atol=1e-5)


def test_pass_manager_edits_in_place_and_frees_replaced_tensors():
    """merge-parallel concatenates two branch weights into one; the branch arrays must be garbage
    once the pass is done (surgery holds the weights once, not once per pass)."""
    w_old, w_new = (RNG.normal(size=(80, 64)).astype(np.float32) for _ in range(2))
    nodes = [helper.make_node("Gemm", ["x", "w_old"], ["a"], name="old", transB=1),
             helper.make_node("Gemm", ["x", "w_new"], ["b"], name="new", transB=1),
             helper.make_node("Concat", ["a", "b"], ["y"], name="cat", axis=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 160])],
                              [numpy_helper.from_array(w_old, "w_old"), numpy_helper.from_array(w_new, "w_new")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    lean = LeanModel.from_proto(model)
    refs = [weakref.ref(a) for a in lean.weights.values()]
    seen = []
    out, results = PassManager([("merge-parallel", merge_parallel)]).run(lean, after_each=lambda n, m: seen.append(n))
    assert out is lean and seen == ["merge-parallel"] and results[0].did_change
    gc.collect()
    assert [r() for r in refs] == [None, None]
    [merged] = lean.weights.values()
    np.testing.assert_array_equal(merged, np.concatenate([w_old, w_new]))
    x = RNG.normal(size=(2, 64)).astype(np.float32)
    np.testing.assert_allclose(OrtRunner(lean).run(x), _run(model.SerializeToString(), {"x": x}), rtol=1e-6, atol=1e-5)


SHARED_BUILD_CASES = {
    "wide-fc-and-conv": ("surgeon:digitnet", 32, [GrowStep("wide", "classifier.0", 16), GrowStep("wide", "features.8", 8)]),
    "net2net-deep-zero": ("surgeon:digitnet", 32, [GrowStep("wide", "features.8", 8, init="net2net", gamma_init=15.0),
                                                   GrowStep("deep", "classifier.3", 40, eps=1e-5),
                                                   GrowStep("wide", "classifier.3", 12, init="zero", norm=False)]),
    "resnet18-conv": ("torchvision:resnet18", 64, [GrowStep("wide", "layer4.1.conv1", 16)]),
}


@pytest.mark.parametrize("case", sorted(SHARED_BUILD_CASES))
def test_shared_weight_build_matches_the_ordinary_one(tmp_path, case):
    """share_weights=True builds on the meta device (no weight is ever written) and takes the
    checkpoint's tensors as they are: same numbers as the ordinary build, no copies."""
    arch, size, steps = SHARED_BUILD_CASES[case]
    ckpt_path = _grown_checkpoint(tmp_path / "g.pt", steps, arch=arch, size=size)
    ordinary = read_checkpoint(ckpt_path).build_model()
    ckpt = read_checkpoint(ckpt_path)
    assert ckpt._grow(False, "meta") is not None  # the meta path works for this recipe (no fallback)
    shared = ckpt.build_model(share_weights=True)
    state = dict(shared.state_dict())
    assert state.keys() == ckpt.state_dict.keys()
    assert all(state[k].data_ptr() == v.data_ptr() for k, v in ckpt.state_dict.items())  # no copies
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(shared(x), ordinary(x), rtol=0, atol=0)


def test_load_maps_external_data_instead_of_reading_it(tmp_path, monkeypatch):
    monkeypatch.setattr(lean_mod, "EXTERNAL_DATA_THRESHOLD", 1000)
    model = _mlp()
    [path, _] = LeanModel.from_proto(model).save(tmp_path / "m.onnx")
    loaded = LeanModel.load(path)
    assert set(loaded.weights) == {"w1", "w2"} and all(isinstance(a, np.memmap) for a in loaded.weights.values())
    assert not any(t.data_location == TensorProto.EXTERNAL for t in loaded.proto.graph.initializer)
    x = RNG.normal(size=(2, 64)).astype(np.float32)
    np.testing.assert_array_equal(OrtRunner(path).run(x), _run(model.SerializeToString(), {"x": x}))
    (tmp_path / "m.onnx.data").unlink()
    with pytest.raises(SurgeonError, match="tensor w1's external data location 'm.onnx.data' does not exist"):
        LeanModel.load(path)
