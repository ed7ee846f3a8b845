"""The TensorRT engine runner without PyTorch: its calls into TensorRT's execution context and into
Polygraphy's CUDA wrapper, against stand-ins for both (no GPU or TensorRT runtime here; the real
path runs where a GPU and TensorRT are), plus the Polygraphy API it relies on."""

from __future__ import annotations

import inspect
import sys
import types

import numpy as np
import pytest

from surgeon.errors import SurgeonError
from surgeon.runtime.backends import tensorrt_engine

MEMORY: dict[int, np.ndarray] = {}  # the stand-in "device": pointer -> array


class _DeviceArray:
    def __init__(self, dtype):
        self.dtype, self.ptr, self.allocations = np.dtype(dtype), 0, 0

    def resize(self, shape):
        need = int(np.prod(shape)) * self.dtype.itemsize
        if self.ptr == 0 or MEMORY[self.ptr].nbytes < need:
            self.ptr = 1000 + len(MEMORY)
            MEMORY[self.ptr] = np.zeros(need, np.uint8)
            self.allocations += 1
        self.shape = tuple(shape)
        return self

    def _view(self):
        return MEMORY[self.ptr][: int(np.prod(self.shape)) * self.dtype.itemsize].view(self.dtype).reshape(self.shape)

    def copy_from(self, host, stream=None):
        assert host.flags.c_contiguous and host.dtype == self.dtype and stream is not None
        self._view()[...] = host
        return self

    def copy_to(self, host, stream=None):
        assert host.dtype == self.dtype and stream is not None
        host[...] = self._view()
        return host


class _Context:
    def __init__(self):
        self.addresses, self.shape, self.streams = {}, None, []

    def set_input_shape(self, name, shape):
        self.shape = shape
        return shape[0] <= 8  # the profile's max batch

    def get_tensor_shape(self, name):
        return (self.shape[0], 10)

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr

    def execute_async_v3(self, stream):
        self.streams.append(stream)
        n = self.shape[0]
        x = MEMORY[self.addresses["images"]][: int(np.prod(self.shape)) * 2].view(np.float16).reshape(self.shape)
        y = MEMORY[self.addresses["logits"]][: n * 10 * 2].view(np.float16).reshape(n, 10)
        y[...] = x.reshape(n, -1)[:, :10] * 2  # the "engine": twice the first ten inputs
        return True


@pytest.fixture
def runner(monkeypatch, tmp_path):
    trt = types.ModuleType("tensorrt")
    trt.float32, trt.float16 = "f32", "f16"
    context = _Context()
    engine = types.SimpleNamespace(create_execution_context=lambda: context, get_tensor_dtype=lambda name: trt.float16)
    trt.Runtime = lambda logger: types.SimpleNamespace(deserialize_cuda_engine=lambda data: engine)
    stream = types.SimpleNamespace(ptr=77, synchronize=lambda: None)
    pcuda = types.ModuleType("polygraphy.cuda")
    pcuda.Stream, pcuda.DeviceArray = (lambda: stream), (lambda dtype: _DeviceArray(dtype))
    datatype = types.ModuleType("polygraphy.datatype")
    datatype.DataType = types.SimpleNamespace(from_dtype=lambda d: d)
    polygraphy = types.ModuleType("polygraphy")
    polygraphy.cuda = pcuda
    for name, module in {"tensorrt": trt, "polygraphy": polygraphy, "polygraphy.cuda": pcuda,
                         "polygraphy.datatype": datatype}.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(tensorrt_engine, "available", lambda rtx: None)
    monkeypatch.setattr("surgeon.trt.toolkit.logger_for", lambda trt: types.SimpleNamespace(native=None, errors=[]))
    path = tmp_path / "m.engine"
    path.write_bytes(b"plan")
    return tensorrt_engine.EngineRunner(path, "images", "logits", rtx=False), context


def test_runs_a_batch_through_device_buffers_on_its_stream(runner):
    r, context = runner
    x = np.random.default_rng(0).standard_normal((4, 3, 4, 4)).astype(np.float32)
    y = r.run(x)
    assert y.dtype == np.float32 and y.shape == (4, 10)  # fp16 engine I/O, float32 logits
    np.testing.assert_allclose(y, x.astype(np.float16).reshape(4, -1)[:, :10].astype(np.float32) * 2, rtol=1e-3)
    assert context.streams == [77] and r.backend == "trt"


def test_buffers_are_reused_and_grow_with_the_batch(runner):
    r, _ = runner
    r.run(np.ones((4, 3, 2, 2), np.float32))
    r.run(np.ones((2, 3, 2, 2), np.float32))
    assert r._in.allocations == 1 and r._out.allocations == 1
    r.run(np.ones((8, 3, 2, 2), np.float32))
    assert r._in.allocations == 2


def test_a_batch_outside_the_profile_is_one_line(runner):
    r, _ = runner
    with pytest.raises(SurgeonError, match=r"cannot take a batch of shape \[9, 3, 2, 2\].*surgeon build --batch"):
        r.run(np.ones((9, 3, 2, 2), np.float32))


def test_polygraphy_offers_what_the_runner_calls():
    pcuda = pytest.importorskip("polygraphy.cuda", reason="polygraphy is not installed")
    from polygraphy.datatype import DataType

    assert list(inspect.signature(pcuda.DeviceArray).parameters) == ["shape", "dtype"]
    assert list(inspect.signature(pcuda.DeviceArray.copy_from).parameters)[1:] == ["host_buffer", "stream"]
    assert list(inspect.signature(pcuda.DeviceArray.copy_to).parameters)[1:] == ["host_buffer", "stream"]
    assert {"resize", "free"} <= set(vars(pcuda.DeviceArray)) and {"synchronize", "free"} <= set(vars(pcuda.Stream))
    assert DataType.from_dtype(np.dtype(np.float16)) == DataType.FLOAT16


def test_without_polygraphy_it_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    monkeypatch.setitem(sys.modules, "polygraphy.cuda", None)
    assert "pip install polygraphy" in tensorrt_engine.available(rtx=False)
