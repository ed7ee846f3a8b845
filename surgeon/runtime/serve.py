"""``surgeon serve``: any surgeon artifact behind Triton Inference Server, through PyTriton.

Two models are bound (KServe v2 over HTTP on ``port``, gRPC on ``port + 1``, Prometheus metrics on
``port + 2``; health at ``/v2/health/ready``, 200 only once every model is ready):

``NAME``         input ``images`` FP32 ``[3, S, S]`` (preprocessed, as ``Session.preprocess`` makes them)
                 -> output ``logits`` FP32 ``[classes]``
``NAME_image``   input ``image`` BYTES ``[1]`` (an encoded JPEG/PNG/... file), decoded and preprocessed
                 with the artifact's own preprocessing -> ``logits`` FP32 ``[classes]``, ``label`` BYTES
                 ``[1]`` (top-1 class name), ``score`` FP32 ``[1]`` (its softmax probability)

Both batch dynamically (``max_batch_size``, ``max_queue_delay_microseconds``). Triton itself answers a
wrong dtype, a wrong shape or a batch over the maximum with HTTP 400 before any Python runs.

Errors found in Python (an image that does not decode, or is over ``max_image_bytes``) must reach
only the request that carried them, with a 4xx status. PyTriton 0.7 turns any exception an infer
function raises (``PyTritonBadParameterError``, ``PyTritonValidationError`` included) into one
``TritonModelException`` for the whole dynamic batch, which Triton answers with HTTP 500 to every
request batched with the bad one. So the image model declares a fourth output, ``surgeon_error``
BYTES ``[1]``, that a successful response never contains; the proxy model PyTriton copies into
Triton's Python backend gets a five-line patch (:func:`_patch_proxy_source`) that turns a response
carrying it into ``InferenceResponse(error=TritonError(msg, TritonError.INVALID_ARG))``: HTTP 400 /
gRPC INVALID_ARGUMENT for that request only. If the installed PyTriton's proxy does not have the
code the patch expects, ``serve`` refuses to start rather than serve without it.

HTTP reaches Triton only through :mod:`surgeon.runtime.serve_proxy` (Triton's own HTTP server listens
on a loopback port behind it): a body over its model's limit (:func:`request_limits`, from
``max_batch`` and the input size) gets 413 before it is read, and the one request that crashes this
Triton (a form-urlencoded body of about 4 MiB, see that module) never reaches it as such. If Triton
dies anyway, :func:`serve` raises :class:`SurgeonError` (``surgeon serve`` exits 1 with one line) so
that a supervisor restarts it.

The Python backend stub loads ``libpython``: ``serve`` puts ``sysconfig.get_config_var("LIBDIR")``
on ``LD_LIBRARY_PATH`` (in ``os.environ``, inherited by ``tritonserver``) before starting Triton.
SIGTERM is handled like SIGINT: Triton and its stubs stop, the workspace is removed, ``serve`` returns.
"""

from __future__ import annotations

import io
import logging
import os
import re
import signal
import socket
import sysconfig
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from surgeon.errors import SurgeonError
from surgeon.imageio import DEFAULT_MAX_IMAGE_PIXELS, to_rgb
from surgeon.runtime.serve_proxy import Limits, Proxy, ProxyThread

LOG = logging.getLogger("surgeon.serve")
ERROR_OUTPUT = "surgeon_error"
# decompression-bomb guard: a larger image is refused before decoding (the same default everywhere)
MAX_IMAGE_PIXELS = DEFAULT_MAX_IMAGE_PIXELS
JSON_BYTES_PER_VALUE = 32  # one FP32 value as KServe JSON text ("-0.0012345678901234567, ") with room to spare
REQUEST_OVERHEAD = 64 << 10  # what surrounds the data in a request: names, datatype, shape, parameters

_PATCH_ANCHOR = ("def _wrap_response(response: Response, requested_outputs_names, model_outputs_dict):\n"
                 "    if response.data is not None:\n")
_PATCH = (
    "def _wrap_response(response: Response, requested_outputs_names, model_outputs_dict):\n"
    f"    if response.data is not None and {ERROR_OUTPUT!r} in response.data:  # surgeon serve: a 400\n"
    f"        _msg = response.data[{ERROR_OUTPUT!r}].reshape(-1)[0]\n"
    "        _msg = _msg.decode('utf-8', 'replace') if isinstance(_msg, bytes) else str(_msg)\n"
    "        return pb_utils.InferenceResponse(error=pb_utils.TritonError(_msg, pb_utils.TritonError.INVALID_ARG))\n"
    "    if response.data is not None:\n"
)


class BadRequest(ValueError):
    """What is wrong with one request; it becomes that request's 400 response."""


def _patch_proxy_source(source: bytes) -> bytes:
    text = source.decode("utf-8")
    if text.count(_PATCH_ANCHOR) != 1:
        raise SurgeonError("this nvidia-pytriton's proxy model is not the one surgeon serve can patch for per-request "
                           "400 errors; install the version in surgeon's `serve` extra (pip install 'surgeon[serve]')")
    return text.replace(_PATCH_ANCHOR, _PATCH).encode("utf-8")


def _install_proxy_patch() -> None:
    """Make every model PyTriton writes (remote or local model store) use the patched proxy model."""
    from pytriton.models.model import Model

    if getattr(Model, "_surgeon_patched", False):
        return
    import pytriton.proxy

    proxy = os.path.join(os.path.dirname(pytriton.proxy.__file__), "model.py")  # not importable outside Triton
    with open(proxy, "rb") as f:
        _patch_proxy_source(f.read())  # fail now, not at the first request
    get_files, generate = Model.get_proxy_model_files, Model.generate_model

    def get_proxy_model_files(self):
        files = get_files(self)
        return {k: (_patch_proxy_source(v) if k.endswith("/model.py") else v) for k, v in files.items()}

    def generate_model(self, model_repository):
        generate(self, model_repository)
        path = model_repository / self.model_name / str(self.model_version) / "model.py"
        path.write_bytes(_patch_proxy_source(path.read_bytes()))

    Model.get_proxy_model_files, Model.generate_model = get_proxy_model_files, generate_model
    Model._surgeon_patched = True


def free_base_port() -> int:
    """A port p with p, p+1 and p+2 free on loopback (HTTP, gRPC, metrics)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base > 65000:
            continue
        try:
            for p in (base, base + 1, base + 2):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
    raise RuntimeError("no three consecutive free ports")


def _free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request_limits(name: str, input_shape: tuple[int, ...], max_batch: int, max_image_bytes: int) -> Limits:
    """The largest HTTP request body each model accepts: a full batch of its input as JSON text (the
    binary tensor extension needs 4 bytes a value, less), or of images each up to ``max_image_bytes``."""
    values = max_batch * int(np.prod(input_shape))
    return Limits({name: values * JSON_BYTES_PER_VALUE + REQUEST_OVERHEAD,
                   f"{name}_image": max_batch * (max_image_bytes + 4) + REQUEST_OVERHEAD})


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "its exit code is unknown"
    if code < 0 or code > 128:
        sig = -code if code < 0 else code - 128
        try:
            return f"killed by signal {sig}, {signal.Signals(sig).name}"
        except ValueError:
            return f"killed by signal {sig}"
    return f"exit code {code}"


def _tritonserver_exit_code(triton: Any) -> int | None:
    """The dead tritonserver's exit code (negative: killed by that signal), where PyTriton has it. PyTriton
    keeps it to itself (its exit callbacks skip one registered after its own), so it is read from the
    ``sh`` command it ran; None if this PyTriton keeps it elsewhere."""
    cmd = getattr(getattr(triton, "_triton_server", None), "_tritonserver_running_cmd", None)
    try:
        code = cmd.process.exit_code if cmd is not None else None
    except Exception:  # noqa: BLE001 - only a better message is lost
        return None
    return code if isinstance(code, int) else None


def model_name_for(path: str | os.PathLike[str]) -> str:
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", os.path.splitext(os.path.basename(os.fspath(path)))[0]).strip("_")
    return stem or "surgeon"


def _softmax_top1(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    top = probs.argmax(axis=1)
    return top, probs[np.arange(len(top)), top].astype(np.float32)


@dataclass
class Handlers:
    """The two infer functions. Each gets the requests of one dynamic batch, runs the model once on
    all of them and answers each request on its own."""

    session: Any
    max_image_bytes: int
    max_image_pixels: int = MAX_IMAGE_PIXELS

    def infer_tensors(self, requests: list) -> list[dict[str, np.ndarray]]:
        arrays = [np.asarray(r["images"], dtype=np.float32) for r in requests]  # Triton checked dtype and shape
        logits = self.session.run(np.concatenate(arrays)) if arrays else np.zeros((0, 0), np.float32)
        out, start = [], 0
        for a in arrays:
            out.append({"logits": logits[start:start + len(a)]})
            start += len(a)
        return out

    def decode(self, blob: Any) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        data = bytes(blob) if not isinstance(blob, bytes) else blob
        if not data:
            raise BadRequest("empty image")
        if len(data) > self.max_image_bytes:
            raise BadRequest(f"image of {len(data)} bytes is over the limit of {self.max_image_bytes} bytes")
        try:
            with Image.open(io.BytesIO(data)) as im:
                if im.width * im.height > self.max_image_pixels:
                    raise BadRequest(f"image of {im.width}x{im.height} pixels is over the limit of "
                                     f"{self.max_image_pixels}")
                rgb = to_rgb(im)  # the one decoding rule: 16-bit and float images scaled, not clipped
        except BadRequest:
            raise
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise BadRequest(f"not a decodable image ({type(exc).__name__}: {str(exc)[:200]})") from None
        return self.session.preprocess([rgb])[0]

    def infer_images(self, requests: list) -> list[dict[str, np.ndarray]]:
        prepared: list[np.ndarray | None] = []
        errors: list[str | None] = []
        for r in requests:
            blobs = np.asarray(r["image"], dtype=object).reshape(len(r["image"]), -1)
            try:
                if blobs.shape[1] != 1:
                    raise BadRequest(f"input 'image' must have shape [N, 1], got {list(blobs.shape)}")
                prepared.append(np.stack([self.decode(b) for b in blobs[:, 0]]))
                errors.append(None)
            except BadRequest as exc:
                prepared.append(None)
                errors.append(str(exc))
        good = [p for p in prepared if p is not None]
        logits = self.session.run(np.concatenate(good)) if good else None
        names = self.session.classes
        out, start = [], 0
        for p, err in zip(prepared, errors):
            if p is None:
                out.append({ERROR_OUTPUT: np.array([[err.encode("utf-8")]], dtype=object)})
                continue
            chunk = logits[start:start + len(p)]
            start += len(p)
            top, score = _softmax_top1(chunk)
            labels = np.array([[(names[i] if i < len(names) else str(i)).encode("utf-8")] for i in top], dtype=object)
            out.append({"logits": chunk, "label": labels, "score": score.reshape(-1, 1)})
        return out


def _libpython_on_ld_path() -> None:
    libdir = sysconfig.get_config_var("LIBDIR")
    current = os.environ.get("LD_LIBRARY_PATH", "")
    if libdir and libdir not in current.split(os.pathsep):
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, current) if p)


def serve(model: str, *, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 32, max_queue_delay_us: int = 500,
          backend: str = "auto", name: str | None = None, max_image_bytes: int = 16 << 20,
          max_image_pixels: int = MAX_IMAGE_PIXELS, trust_code: bool = False,
          on_ready: Callable[[str], None] | None = None) -> None:
    """Serve MODEL until SIGINT/SIGTERM; returns after a clean stop, raises SurgeonError if Triton dies.
    ``on_ready`` gets the start-up lines (what is served where), one call each."""
    if not 1 <= port <= 65533:
        raise SurgeonError(f"--port must be in 1..65533 (gRPC takes port+1, metrics port+2), got {port}")
    if max_batch < 1:
        raise SurgeonError(f"--max-batch must be at least 1, got {max_batch}")
    if max_queue_delay_us < 0:
        raise SurgeonError(f"--max-queue-delay-us must not be negative, got {max_queue_delay_us}")
    if max_image_bytes < 1:
        raise SurgeonError(f"--max-image-bytes must be positive, got {max_image_bytes}")
    if max_image_pixels < 1:
        raise SurgeonError(f"--max-image-pixels must be positive, got {max_image_pixels}")
    named = name is not None
    name = name or model_name_for(model)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
        raise SurgeonError(f"--name must be letters, digits, '_' and '-', got {name!r}")
    try:
        from pytriton.decorators import batch  # noqa: F401  (checks the install is complete)
        from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
        from pytriton.triton import Triton, TritonConfig
    except ImportError as exc:
        raise SurgeonError(f"surgeon serve needs PyTriton ({exc.name} is missing): pip install 'surgeon[serve]' "
                           f"(nvidia-pytriton with numpy<2)") from None

    from surgeon.runtime.session import Session

    session = Session(model, backend, trust_code=trust_code)
    art = session.artifact
    if art.kind == "engine" and max_batch > art.max_batch:
        raise SurgeonError(f"--max-batch {max_batch} is over the engine's largest batch {art.max_batch}")
    classes = len(art.classes) or int(session.run(np.zeros((1, *art.input_shape), np.float32)).shape[1])
    handlers = Handlers(session, max_image_bytes, max_image_pixels)
    image_name = f"{name}_image"
    limits = request_limits(name, tuple(art.input_shape), max_batch, max_image_bytes)

    _install_proxy_patch()
    _libpython_on_ld_path()
    triton_http = _free_loopback_port()  # Triton's own HTTP front end: loopback only, behind the proxy
    config = TritonConfig(http_address="127.0.0.1", http_port=triton_http, grpc_address=host, grpc_port=port + 1,
                          metrics_address=host, metrics_port=port + 2, allow_metrics=True, allow_gpu_metrics=False,
                          exit_on_error=True)
    model_config = ModelConfig(max_batch_size=max_batch,
                               batcher=DynamicBatcher(max_queue_delay_microseconds=max_queue_delay_us))
    proxy = Proxy(triton_http, limits, [name, image_name])
    front = ProxyThread(host, port, proxy)
    base = f"http://{host}:{port}"
    lines = [
        f"serving {art.path.name} ({session.backend}) on {base}, gRPC {host}:{port + 1}, metrics "
        f"http://{host}:{port + 2}/metrics (Triton's own HTTP on 127.0.0.1:{triton_http}); Ctrl+C or SIGTERM stops",
        f"model {name!r}: FP32 images {list(art.input_shape)} -> logits [{classes}]: "
        f"POST {base}/v2/models/{name}/infer "
        f"(bodies up to {limits.per_model[name]} bytes)",
        f"model {image_name!r}: encoded image BYTES [1] -> logits, label, score: "
        f"POST {base}/v2/models/{image_name}/infer "
        f"(bodies up to {limits.per_model[image_name]} bytes)",
        f"ready when both models are: GET {base}/v2/health/ready",
    ]
    if not named:
        lines.append(f"the model names come from the file name {os.path.basename(os.fspath(model))!r}; --name sets "
                     f"another")

    stop = threading.Event()

    def _on_signal(signum, frame):  # Triton.serve() exits its loop on KeyboardInterrupt and stops cleanly
        if not stop.is_set():
            stop.set()
            raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        front.start()
        with Triton(config=config) as triton:
            triton.bind(model_name=name, infer_func=handlers.infer_tensors,
                        inputs=[Tensor(name="images", dtype=np.float32, shape=art.input_shape)],
                        outputs=[Tensor(name="logits", dtype=np.float32, shape=(classes,))],
                        config=model_config, strict=False)
            triton.bind(model_name=image_name, infer_func=handlers.infer_images,
                        inputs=[Tensor(name="image", dtype=np.bytes_, shape=(1,))],
                        outputs=[Tensor(name="logits", dtype=np.float32, shape=(classes,)),
                                 Tensor(name="label", dtype=np.bytes_, shape=(1,)),
                                 Tensor(name="score", dtype=np.float32, shape=(1,)),
                                 Tensor(name=ERROR_OUTPUT, dtype=np.bytes_, shape=(1,))],
                        config=model_config, strict=False)
            triton.run()
            for line in lines if on_ready else ():
                on_ready(line)
            proxy.started.set()
            triton.serve()  # returns on a signal, or when tritonserver or a model's backend stub has died
            if not stop.is_set():
                raise SurgeonError(f"Triton Inference Server stopped unexpectedly "
                                   f"({_exit_reason(_tritonserver_exit_code(triton))}; its log is above): surgeon "
                                   f"serve exits so that a supervisor restarts it")
    except KeyboardInterrupt:
        pass  # a signal during start-up: the context manager has stopped Triton already
    finally:
        front.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
