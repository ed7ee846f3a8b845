"""``surgeon serve`` end to end: a real Triton Inference Server (PyTriton) on loopback, spoken to with
tritonclient over HTTP and gRPC. Skipped where nvidia-pytriton is not installed (pip install '.[serve]')."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pytriton", reason="surgeon serve needs nvidia-pytriton: pip install -e '.[dev,serve]'")
httpclient = pytest.importorskip("tritonclient.http", reason="needs tritonclient[http]")
grpcclient = pytest.importorskip("tritonclient.grpc", reason="needs tritonclient[grpc]")

from click.testing import CliRunner
from PIL import Image
from tritonclient.utils import InferenceServerException

from surgeon.cli import cli
from surgeon.errors import SurgeonError
from surgeon.export.onnx_export import export_checkpoint
from surgeon.grow.recipe import GrowStep
from surgeon.runtime import Session
from surgeon.runtime.serve import _patch_proxy_source, free_base_port
from tests.export.test_onnx_export import _grown_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

NAME = "grown"
MAX_BATCH = 8
MAX_IMAGE_BYTES = 20_000


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status
    except OSError as exc:
        return getattr(exc, "code", 0) or 0


class Server:
    def __init__(self, model: Path, log: Path):
        self.port = free_base_port()
        self.log = log
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "surgeon", "serve", str(model), "--port", str(self.port), "--name", NAME,
             "--max-batch", str(MAX_BATCH), "--max-queue-delay-us", "5000", "--max-image-bytes", str(MAX_IMAGE_BYTES)],
            stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, cwd=Path(__file__).parents[2])
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"surgeon serve exited with {self.proc.returncode}:\n{log.read_text()[-3000:]}")
            if all(_status(self.url(f"/v2/models/{m}/ready")) == 200 for m in (NAME, NAME + "_image")):
                return
            time.sleep(0.5)
        self.stop()
        raise AssertionError(f"surgeon serve not ready after 120 s:\n{log.read_text()[-3000:]}")

    def url(self, path: str, port_offset: int = 0) -> str:
        return f"http://127.0.0.1:{self.port + port_offset}{path}"

    def healthy(self) -> bool:
        return _status(self.url("/v2/health/ready")) == 200 and _status(self.url(f"/v2/models/{NAME}_image/ready")) == 200

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("serve")
    ckpt = _grown_checkpoint(d / "grown.pt", [GrowStep("wide", "classifier.0", 16)])
    return Path(export_checkpoint(ckpt, d / "model.onnx").path)


@pytest.fixture(scope="module")
def session(model_path) -> Session:
    return Session(model_path, "ort-cpu")


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    srv = Server(model_path, tmp_path_factory.mktemp("serve-log") / "serve.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, size=(24 + 4 * i, 28, 3), dtype=np.uint8) for i in range(6)]


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def _client(server: Server, proto: str):
    if proto == "http":
        return httpclient, httpclient.InferenceServerClient(f"127.0.0.1:{server.port}", concurrency=1)
    return grpcclient, grpcclient.InferenceServerClient(f"127.0.0.1:{server.port + 1}")


def _infer(server: Server, proto: str, model: str, name: str, array: np.ndarray, dtype: str):
    mod, client = _client(server, proto)
    inp = mod.InferInput(name, list(array.shape), dtype)
    inp.set_data_from_numpy(array)
    return client.infer(model, [inp])


def _is_4xx(exc: InferenceServerException, proto: str) -> bool:
    if proto == "http":
        return 400 <= int(exc.status()) < 500
    return exc.status() in ("StatusCode.INVALID_ARGUMENT", "StatusCode.OUT_OF_RANGE")


# -- no server needed ---------------------------------------------------------------------------------


def test_cli_errors_are_one_line(tmp_path):
    res = CliRunner().invoke(cli, ["serve", str(tmp_path / "missing.onnx")])
    assert res.exit_code == 1 and res.output.strip() == f"error: model {tmp_path / 'missing.onnx'} does not exist"
    res = CliRunner().invoke(cli, ["serve", "x.onnx", "--port", "70000"])
    assert res.exit_code == 1 and "--port" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(cli, ["serve", "--help"])
    assert res.exit_code == 0 and "Example:" in res.output and "--max-queue-delay-us" in res.output


def test_proxy_patch_refuses_an_unknown_pytriton():
    with pytest.raises(SurgeonError, match="nvidia-pytriton"):
        _patch_proxy_source(b"def something_else():\n    pass\n")
    import pytriton.proxy

    patched = _patch_proxy_source((Path(pytriton.proxy.__file__).parent / "model.py").read_bytes()).decode()
    assert "TritonError.INVALID_ARG" in patched
    compile(patched, "model.py", "exec")


# -- one server for the module ------------------------------------------------------------------------


def test_health_metadata_and_metrics(server):
    assert server.healthy()
    with urllib.request.urlopen(server.url(f"/v2/models/{NAME}_image")) as r:
        meta = r.read().decode()
    assert '"image"' in meta and '"label"' in meta and '"score"' in meta
    with urllib.request.urlopen(server.url("/metrics", port_offset=2)) as r:
        assert "nv_inference_request_success" in r.read().decode()


@pytest.mark.parametrize("proto", ["http", "grpc"])
def test_float_tensors_match_session(server, session, images, proto):
    batch = session.preprocess(images)
    res = _infer(server, proto, NAME, "images", batch, "FP32")
    logits = res.as_numpy("logits")
    assert logits.shape == (len(images), 4) and logits.dtype == np.float32
    np.testing.assert_allclose(logits, session.run(batch), rtol=1e-5, atol=1e-5)
    expected = [top[0].index for top in session.predict(images, topk=1)]
    assert logits.argmax(axis=1).tolist() == expected


@pytest.mark.parametrize("proto", ["http", "grpc"])
def test_png_bytes_match_session(server, session, images, proto):
    blobs = np.array([[_png(a)] for a in images[:4]], dtype=object)
    res = _infer(server, proto, NAME + "_image", "image", blobs, "BYTES")
    expected = session.predict(images[:4], topk=1)
    labels = [row[0].decode() for row in res.as_numpy("label")]
    assert labels == [top[0].label for top in expected]
    np.testing.assert_allclose(res.as_numpy("score")[:, 0], [top[0].score for top in expected], rtol=1e-4)
    np.testing.assert_allclose(res.as_numpy("logits"), session.run(session.preprocess(images[:4])), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("proto", ["http", "grpc"])
@pytest.mark.parametrize("case", ["dtype", "shape", "batch", "garbage", "too-big", "empty"])
def test_malformed_requests_get_4xx_and_server_stays_healthy(server, proto, case):
    x = np.zeros((2, 3, 32, 32), np.float32)
    calls = {
        "dtype": lambda: _infer(server, proto, NAME, "images", x.astype(np.float64), "FP64"),
        "shape": lambda: _infer(server, proto, NAME, "images", np.zeros((2, 3, 16, 32), np.float32), "FP32"),
        "batch": lambda: _infer(server, proto, NAME, "images", np.zeros((MAX_BATCH + 1, 3, 32, 32), np.float32), "FP32"),
        "garbage": lambda: _infer(server, proto, NAME + "_image", "image", np.array([[b"\x89PNG not really"]], object), "BYTES"),
        "too-big": lambda: _infer(server, proto, NAME + "_image", "image",
                                  np.array([[b"\xff" * (MAX_IMAGE_BYTES + 1)]], object), "BYTES"),
        "empty": lambda: _infer(server, proto, NAME + "_image", "image", np.array([[b""]], object), "BYTES"),
    }
    with pytest.raises(InferenceServerException) as info:
        calls[case]()
    assert _is_4xx(info.value, proto), (info.value.status(), str(info.value))
    assert server.healthy()


def test_a_bad_image_fails_only_its_own_request(server, session, images):
    """Requests batched together by Triton's dynamic batcher: the garbage one gets 400, the others answers."""
    good = np.array([[_png(images[0])]], dtype=object)
    want = session.predict([images[0]], topk=1)[0][0].label
    results: dict[int, object] = {}

    def one(i: int) -> None:
        blob = np.array([[b"garbage"]], object) if i == 3 else good
        try:
            results[i] = _infer(server, "http", NAME + "_image", "image", blob, "BYTES").as_numpy("label")[0, 0].decode()
        except InferenceServerException as exc:
            results[i] = int(exc.status())

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == {i: (400 if i == 3 else want) for i in range(8)}


def test_concurrent_load_loses_nothing(server, session):
    rng = np.random.default_rng(1)
    inputs = rng.standard_normal((8, 50, 1, 3, 32, 32)).astype(np.float32)
    errors: list[str] = []
    got = np.zeros((8, 50, 4), np.float32)

    def worker(t: int) -> None:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}")
        for i in range(50):
            inp = httpclient.InferInput("images", [1, 3, 32, 32], "FP32")
            inp.set_data_from_numpy(inputs[t, i])
            try:
                got[t, i] = client.infer(NAME, [inp]).as_numpy("logits")[0]
            except Exception as exc:  # noqa: BLE001 - any failure counts
                errors.append(repr(exc))
        client.close()

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[:3]
    want = session.run(inputs.reshape(400, 3, 32, 32)).reshape(8, 50, 4)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)  # every request answered, with its own answer
    assert server.healthy()


def test_zz_sigterm_stops_cleanly(server):
    """Last in the module: SIGTERM ends the process with 0, leaves no tritonserver and frees the ports."""
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(60) == 0, server.log.read_text()[-2000:]
    out = subprocess.run(["ps", "-eo", "pid,ppid,args"], check=False, capture_output=True, text=True).stdout
    left = [line for line in out.splitlines() if "tritonserver" in line and f"={server.port}" in line]
    assert not left, left
    for p in (server.port, server.port + 1, server.port + 2):
        with socket.socket() as s:
            s.connect_ex(("127.0.0.1", p)) != 0 or pytest.fail(f"port {p} still accepts connections")
