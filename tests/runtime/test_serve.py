"""``surgeon serve`` end to end: a real Triton Inference Server (PyTriton) on loopback, spoken to with
tritonclient over HTTP and gRPC. Skipped where nvidia-pytriton is not installed (pip install '.[serve]')."""

from __future__ import annotations

import http.client
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
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
from surgeon.runtime.serve import MAX_IMAGE_PIXELS as DEFAULT_MAX_IMAGE_PIXELS
from surgeon.runtime.serve import (JSON_BYTES_PER_VALUE, _patch_proxy_source, free_base_port, model_name_for,
                                   request_limits)
from surgeon.runtime.serve_proxy import OTHER_PATH_LIMIT, _forward_headers
from tests.export.test_onnx_export import _grown_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

NAME = "grown"
MAX_BATCH = 8
MAX_IMAGE_BYTES = 20_000
MAX_IMAGE_PIXELS = 2_000  # the test images are at most 44x28
FOUR_MIB = 4 << 20


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status
    except OSError as exc:
        return getattr(exc, "code", 0) or 0


class Server:
    def __init__(self, model: Path, log: Path, named: bool = True):
        self.port = free_base_port()
        self.log = log
        self.name = NAME if named else model_name_for(model)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "surgeon", "serve", str(model), "--port", str(self.port),
             *(["--name", NAME] if named else []), "--max-batch", str(MAX_BATCH), "--max-queue-delay-us", "5000",
             "--max-image-bytes", str(MAX_IMAGE_BYTES), "--max-image-pixels", str(MAX_IMAGE_PIXELS)],
            stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, cwd=Path(__file__).parents[2])
        self.ready_before_models: list[dict[str, int]] = []  # /v2/health/ready said 200 while a model was not
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"surgeon serve exited with {self.proc.returncode}:\n{log.read_text()[-3000:]}")
            if _status(self.url("/v2/health/ready")) == 200:
                models = {m: _status(self.url(f"/v2/models/{m}/ready")) for m in (self.name, self.name + "_image")}
                if all(code == 200 for code in models.values()):
                    return
                self.ready_before_models.append(models)
            time.sleep(0.05)
        self.stop()
        raise AssertionError(f"surgeon serve not ready after 120 s:\n{log.read_text()[-3000:]}")

    def url(self, path: str, port_offset: int = 0) -> str:
        return f"http://127.0.0.1:{self.port + port_offset}{path}"

    def healthy(self) -> bool:
        return (_status(self.url("/v2/health/ready")) == 200
                and _status(self.url(f"/v2/models/{self.name}_image/ready")) == 200)

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
    res = CliRunner().invoke(cli, ["serve", "x.onnx", "--max-image-pixels", "0"])
    assert res.exit_code == 1 and res.output.strip() == "error: --max-image-pixels must be positive, got 0"
    res = CliRunner().invoke(cli, ["serve", "--help"])
    assert res.exit_code == 0 and "Example:" in res.output and "--max-queue-delay-us" in res.output
    assert "--max-image-pixels INTEGER" in res.output and f"[default: {DEFAULT_MAX_IMAGE_PIXELS}]" in res.output


def test_request_limits_follow_the_batch_and_the_input_size():
    small, big = (request_limits("m", (3, 32, 32), b, MAX_IMAGE_BYTES) for b in (1, 8))
    assert big.per_model["m"] - small.per_model["m"] == 7 * 3 * 32 * 32 * JSON_BYTES_PER_VALUE
    assert big.per_model["m_image"] > 8 * MAX_IMAGE_BYTES
    assert big.for_path("/v2/models/m/versions/1/infer") == (big.per_model["m"], "m")
    assert big.for_path("/v2/models/m_image/infer") == (big.per_model["m_image"], "m_image")
    assert big.for_path("/v2/models/m/ready") == (OTHER_PATH_LIMIT, None)
    assert big.for_path("/v2/models/other/infer") == (OTHER_PATH_LIMIT, None)


def test_the_crashing_content_type_and_hop_by_hop_headers_are_not_forwarded():
    sent = {"Content-Type": "Application/X-WWW-Form-Urlencoded; charset=utf-8", "Connection": "keep-alive",
            "Expect": "100-continue", "Transfer-Encoding": "chunked", "Host": "x",
            "Inference-Header-Content-Length": "9"}
    assert _forward_headers(sent) == {"Inference-Header-Content-Length": "9"}
    assert _forward_headers({"Content-Type": "application/json"}) == {"Content-Type": "application/json"}


def test_proxy_patch_refuses_an_unknown_pytriton():
    with pytest.raises(SurgeonError, match="nvidia-pytriton"):
        _patch_proxy_source(b"def something_else():\n    pass\n")
    import pytriton.proxy

    patched = _patch_proxy_source((Path(pytriton.proxy.__file__).parent / "model.py").read_bytes()).decode()
    assert "TritonError.INVALID_ARG" in patched
    compile(patched, "model.py", "exec")


# -- one server for the module ------------------------------------------------------------------------


def _raw(server: Server, head: str, body: bytes = b"", timeout: float = 30) -> tuple[int, dict, bytes]:
    """One request written as given on a fresh socket; (status, headers, body) of the answer."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as s:
        s.sendall(head.encode() + body)
        resp = http.client.HTTPResponse(s)
        resp.begin()
        return resp.status, dict(resp.getheaders()), resp.read()


def _post(server: Server, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """urllib's POST: like `curl -d`, it sends Content-Type: application/x-www-form-urlencoded by default."""
    req = urllib.request.Request(server.url(path), data=body, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_start_up_says_what_is_served_where_and_ready_waits_for_the_models(server):
    log = server.log.read_text()
    base = f"http://127.0.0.1:{server.port}"
    for model in (NAME, NAME + "_image"):
        assert sum(f"model {model!r}" in line and f"POST {base}/v2/models/{model}/infer" in line
                   for line in log.splitlines()) == 1, log[-3000:]
    assert f"GET {base}/v2/health/ready" in log
    assert server.ready_before_models == []  # never 200 while a model was still loading


@pytest.mark.parametrize("model", [NAME, NAME + "_image"])
def test_a_form_urlencoded_body_of_4_mib_does_not_kill_the_server(server, model):
    """The real crash: Triton's HTTP library parses a form-urlencoded body (curl -d's and urllib's default
    Content-Type) into two stack buffers its size; 4 MiB overflowed the thread's stack, whatever the body."""
    status, body = _post(server, f"/v2/models/{model}/infer", b"x" * (FOUR_MIB + 1))
    assert status in (400, 413) and "error" in json.loads(body), (status, body[:300])
    assert server.healthy()


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_curl_d_with_a_large_body_gets_413_and_the_server_lives(server, tmp_path):
    """What the issue did: `curl -d @body.json` of a million values (5 MB; Expect: 100-continue)."""
    body = json.dumps({"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 3, 32, 32],
                                   "data": [0.5] * 1_000_000}]})
    (tmp_path / "body.json").write_text(body)
    url = server.url(f"/v2/models/{NAME}/infer")
    out = subprocess.run(["curl", "-s", "-w", "\n%{http_code}", "-d", "@body.json", url], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60, check=False).stdout
    text, _, code = out.rpartition("\n")
    assert code == "413" and "over the limit" in json.loads(text)["error"], out[:300]
    assert server.healthy()


@pytest.mark.parametrize("expect", [True, False])
def test_oversize_body_is_refused_before_it_is_sent(server, expect):
    """Headers announcing 100 MB and no body at all: the answer must come anyway (413, JSON), and
    never a 100 Continue."""
    head = (f"POST /v2/models/{NAME}/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {100 << 20}\r\n"
            f"{'Expect: 100-continue' + chr(13) + chr(10) if expect else ''}\r\n")
    status, headers, body = _raw(server, head, timeout=10)
    assert status == 413 and "over the limit" in json.loads(body)["error"]
    assert headers.get("Content-Type", "").startswith("application/json")
    assert server.healthy()


def test_chunked_oversize_body_gets_413(server):
    chunk = b"x" * (1 << 20)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(f"POST /v2/models/{NAME}/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
        try:
            for _ in range(64):  # 64 MiB at most; the limit for NAME is far below
                s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except OSError:
            pass  # the server answered and closed while we were still sending
        resp = http.client.HTTPResponse(s)
        resp.begin()
        assert resp.status == 413 and "over the limit" in json.loads(resp.read())["error"]
    assert server.healthy()


@pytest.mark.parametrize("body", [b"{", b"not json", b"[]", b"{}", b'{"inputs": 5}',
                                  b'{"inputs":[{"name":"images","datatype":"FP32","shape":[1,3,32,32],"data":[1]}]}'])
def test_malformed_json_gets_400(server, body):
    status, answer = _post(server, f"/v2/models/{NAME}/infer", body, {"Content-Type": "application/json"})
    assert status == 400 and json.loads(answer)["error"], (status, answer)


def test_keep_alive_and_other_paths_pass_through(server, session, images):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    x = session.preprocess(images[:1])
    body = json.dumps({"inputs": [{"name": "images", "datatype": "FP32", "shape": list(x.shape),
                                   "data": x.ravel().tolist()}]})
    for _ in range(3):
        conn.request("POST", f"/v2/models/{NAME}/infer", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        out = json.loads(resp.read())
        assert resp.status == 200
        np.testing.assert_allclose(out["outputs"][0]["data"], session.run(x).ravel(), rtol=1e-5, atol=1e-5)
        sock = conn.sock
    conn.request("GET", f"/v2/models/{NAME}/config")
    resp = conn.getresponse()
    assert resp.status == 200 and json.loads(resp.read())["max_batch_size"] == MAX_BATCH
    assert conn.sock is sock  # one connection for all four requests
    for path in ("/v2/health/live", "/v2", f"/v2/models/{NAME}/versions/1/ready"):
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200, path
    conn.close()


def test_max_image_pixels_is_the_option(server):
    big = np.zeros((50, 50, 3), np.uint8)  # 2500 pixels, over the server's --max-image-pixels 2000
    with pytest.raises(InferenceServerException) as info:
        _infer(server, "http", NAME + "_image", "image", np.array([[_png(big)]], object), "BYTES")
    assert int(info.value.status()) == 400 and "2000" in str(info.value)


def test_a_dead_triton_ends_serve_with_one_line_and_exit_1(model_path, tmp_path):
    srv = Server(model_path, tmp_path / "serve.log", named=False)
    try:
        assert "--name sets another" in srv.log.read_text()  # the name came from model.onnx: said so
        out = subprocess.run(["ps", "-ww", "-eo", "pid,args"], check=True, capture_output=True, text=True).stdout
        pids = [int(line.split()[0]) for line in out.splitlines()
                if "tritonserver " in line and f"--grpc-port {srv.port + 1} " in line]
        assert len(pids) == 1, out
        os.kill(pids[0], signal.SIGSEGV)
        assert srv.proc.wait(60) == 1
        last = srv.log.read_text().strip().splitlines()[-1]
        assert last.startswith("error: Triton Inference Server stopped unexpectedly") and "SIGSEGV" in last, last
    finally:
        srv.stop()


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


def test_int8_model_serves_the_top1_of_session(model_path, images, tmp_path):
    """An int8 Q/DQ file (surgeon quantize, the ort-cpu target) served end to end: the same logits
    and top-1 as Session on that file, over tensors and PNG bytes."""
    from surgeon.export.quantize import QuantizeOptions, quantize_file
    from tests.export.test_quantize import write_generated_images

    calib = write_generated_images(tmp_path / "calib", 64, 32)
    int8 = quantize_file(model_path, tmp_path / "model.int8.onnx",
                         QuantizeOptions(str(calib), target="ort-cpu", min_agreement=0)).path
    session = Session(int8, "ort-cpu")
    assert session.artifact.precision == "int8"
    srv = Server(int8, tmp_path / "serve.log")
    try:
        batch = session.preprocess(images)
        logits = _infer(srv, "http", NAME, "images", batch, "FP32").as_numpy("logits")
        np.testing.assert_allclose(logits, session.run(batch), rtol=1e-5, atol=1e-5)
        expected = session.predict(images[:4], topk=1)
        assert logits.argmax(axis=1)[:4].tolist() == [top[0].index for top in expected]
        blobs = np.array([[_png(a)] for a in images[:4]], dtype=object)
        res = _infer(srv, "grpc", NAME + "_image", "image", blobs, "BYTES")
        assert [row[0].decode() for row in res.as_numpy("label")] == [top[0].label for top in expected]
    finally:
        srv.stop()


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
    out = subprocess.run(["ps", "-ww", "-eo", "pid,ppid,args"], check=False, capture_output=True, text=True).stdout
    left = [line for line in out.splitlines() if "tritonserver" in line and f"--grpc-port {server.port + 1} " in line]
    assert not left, left
    for p in (server.port, server.port + 1, server.port + 2):
        with socket.socket() as s:
            s.connect_ex(("127.0.0.1", p)) != 0 or pytest.fail(f"port {p} still accepts connections")


def test_the_image_model_scales_16_bit_images_instead_of_clipping_them(session):
    from surgeon.runtime.serve import Handlers

    grey8 = np.random.default_rng(1).integers(0, 256, (28, 28), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(grey8.astype(np.uint16) * 257).save(buf, "PNG")  # the same picture at 16 bits
    handlers = Handlers(session, MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS)
    np.testing.assert_array_equal(handlers.decode(buf.getvalue()), handlers.decode(_png(grey8)))
