"""The HTTP front end of ``surgeon serve``: a small streaming reverse proxy (aiohttp) in front of Triton's
own HTTP server, which listens on a loopback-only port behind it.

Why: the libevhtp inside the ``tritonserver`` that nvidia-pytriton 0.7 bundles parses a request body sent
with ``Content-Type: application/x-www-form-urlencoded`` (what ``curl -d`` and Python's urllib send by
default) as query arguments, into two stack buffers the size of the body: a body of about 4 MiB or more
overflows the HTTP thread's 8 MiB stack and kills the whole server (SIGSEGV, or "stack smashing
detected"), whatever the body holds and however it is sent. And this Triton has no option bounding an
HTTP body (no ``--http-max-input-size``). So every request passes through here first:

* a body larger than its path's limit gets 413 with ``{"error": ...}`` before it is read: from its
  ``Content-Length`` (instead of ``100 Continue`` when the client expects one), or, for a chunked body,
  as soon as the bytes streamed past the limit;
* the form-urlencoded content type is dropped (Triton reads KServe v2 JSON whatever the type says);
* a compressed body (``Content-Encoding``) gets 415: Triton would inflate it without any bound;
* Triton's 500 for a body it cannot parse as a KServe v2 request becomes 400;
* ``/v2/health/ready`` is 200 only when Triton and every served model are ready (Triton's own answers
  200 while the models are still loading, so a load balancer would route to 404s).

Everything else (health, metadata, infer, statistics, ...) streams through unchanged on HTTP/1.1
keep-alive connections, both to the client and to Triton. gRPC and metrics are Triton's own ports.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field

from surgeon.errors import SurgeonError

OTHER_PATH_LIMIT = 1 << 20  # health, metadata, repository, ...: nothing legitimate there is large
SMALL_BODY = 256 << 10  # bodies up to this size are read whole and sent in one write (the common case)
_INFER_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/[^/]+)?/infer")
_HOP_BY_HOP = frozenset(h.lower() for h in ("Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization",
                                            "TE", "Trailer", "Transfer-Encoding", "Upgrade", "Expect", "Host",
                                            "Content-Length"))
_FORM = "application/x-www-form-urlencoded"
# What Triton's HTTP front end answers with 500 for a request body it cannot read (a client's mistake).
_PARSE_ERRORS = ("failed to parse the request JSON buffer", "Unable to parse ")


@dataclass(frozen=True)
class Limits:
    """The largest request body, in bytes, per model's infer path and for every other path."""

    per_model: dict[str, int]
    other: int = OTHER_PATH_LIMIT

    def for_path(self, path: str) -> tuple[int, str | None]:
        """(limit, model name or None) for a request path."""
        m = _INFER_PATH.fullmatch(path)
        if m and m.group(1) in self.per_model:
            return self.per_model[m.group(1)], m.group(1)
        return self.other, None


@dataclass
class _Upload:
    """A request body streamed on to Triton, stopped once it passes ``limit``."""

    content: object  # aiohttp StreamReader
    limit: int
    seen: int = 0
    too_large: bool = field(default=False)

    async def chunks(self) -> AsyncIterator[bytes]:
        async for chunk in self.content.iter_any():
            self.seen += len(chunk)
            if self.seen > self.limit:
                self.too_large = True
                raise ValueError("request body over the limit")
            yield chunk


def _json_error(status: int, message: str, *, close: bool = False):
    from aiohttp import web

    resp = web.Response(status=status, text=json.dumps({"error": message}), content_type="application/json")
    if close:
        resp.force_close()
    return resp


def _too_large(length: int | None, limit: int, model: str | None) -> str:
    size = f"of {length} bytes " if length is not None else ""
    if model is None:
        return f"request body {size}is over the limit of {limit} bytes for this path"
    return (f"request body {size}is over the limit of {limit} bytes for model {model!r} (a full batch: surgeon "
            f"serve derives it from --max-batch and the model's input size)")


def _forward_headers(headers) -> dict[str, str]:
    out = {}
    for k, v in headers.items():
        lk = k.lower()
        if lk in _HOP_BY_HOP or (lk == "content-type" and v.strip().lower().startswith(_FORM)):
            continue  # see the module docstring: a form-urlencoded body of 4 MiB crashes Triton
        out[k] = v
    return out


def _triton_error_message(body: bytes) -> str | None:
    try:
        msg = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return None
    return msg if isinstance(msg, str) else None


class Proxy:
    """The aiohttp handler: one instance per server, its upstream connection pool inside."""

    def __init__(self, upstream_port: int, limits: Limits, models: Iterable[str]):
        self.upstream = f"http://127.0.0.1:{upstream_port}"
        self.limits = limits
        self.models = list(models)
        self.session = None  # aiohttp.ClientSession, made inside the event loop
        self.started = threading.Event()  # set by serve() once its start-up is over (and said so)

    async def open(self) -> None:
        import aiohttp

        # No auto headers, no decompression: what the client sent and what Triton answered pass as they are.
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30, force_close=False),
            auto_decompress=False, skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5))

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def handle(self, request):
        if request.path == "/v2/health/ready" and request.method in ("GET", "HEAD"):
            return await self.ready()
        limit, model = self.limits.for_path(request.path)
        length = request.content_length
        if length is not None and length > limit:
            return _json_error(413, _too_large(length, limit, model), close=True)  # the body is never read
        if request.headers.get("Content-Encoding", "identity").strip().lower() not in ("", "identity"):
            return _json_error(415, "compressed request bodies (Content-Encoding) are not accepted: their inflated "
                               "size has no bound; send the body uncompressed", close=True)
        if request.headers.get("Expect", "").lower() == "100-continue" and request.version >= (1, 1):
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # what aiohttp's router would do
            request.writer.output_size = 0
        headers = _forward_headers(request.headers)
        upload = None
        if length is not None and length <= SMALL_BODY:
            data: object = await request.read() if length else None
        elif request.body_exists:
            upload = _Upload(request.content, limit)
            data = upload.chunks()
            if length is not None:
                headers["Content-Length"] = str(length)  # streamed, but not re-chunked
        else:
            data = None
        try:
            async with self.session.request(request.method, self.upstream + request.path_qs, headers=headers,
                                            data=data, allow_redirects=False) as up:
                return await self._answer(request, up, model)
        except Exception as exc:  # noqa: BLE001 - any upstream failure has one of two answers
            if upload is not None and upload.too_large:
                return _json_error(413, _too_large(None, limit, model), close=True)
            import aiohttp

            if isinstance(exc, (aiohttp.ClientError, OSError, asyncio.TimeoutError)):
                return _json_error(503, f"Triton Inference Server is not answering ({type(exc).__name__})")
            raise

    async def _answer(self, request, up, model: str | None):
        from aiohttp import web

        headers = {k: v for k, v in up.headers.items() if k.lower() not in _HOP_BY_HOP}
        if up.content_length is not None and up.content_length <= SMALL_BODY:
            body = await up.read()
            status = up.status
            if status == 500 and model is not None:
                msg = _triton_error_message(body)
                if msg is not None and msg.startswith(_PARSE_ERRORS):
                    status = 400  # Triton could not read the request: the client's mistake, not the server's
            return web.Response(status=status, body=body, headers=headers)
        resp = web.StreamResponse(status=up.status, headers=headers)
        if up.content_length is not None:
            resp.content_length = up.content_length
        await resp.prepare(request)
        async for chunk in up.content.iter_any():
            await resp.write(chunk)
        await resp.write_eof()
        return resp

    async def _status(self, path: str) -> int:
        try:
            async with self.session.get(self.upstream + path) as r:
                await r.read()
                return r.status
        except Exception:  # noqa: BLE001 - not up (yet) is not ready
            return 0

    async def ready(self):
        from aiohttp import web

        if not self.started.is_set():
            return _json_error(503, "surgeon serve is starting")
        paths = ["/v2/health/ready"] + [f"/v2/models/{m}/ready" for m in self.models]
        statuses = await asyncio.gather(*(self._status(p) for p in paths))
        if statuses[0] != 200:
            return _json_error(503, "Triton Inference Server is not ready")
        waiting = [m for m, s in zip(self.models, statuses[1:]) if s != 200]
        if waiting:
            return _json_error(503, f"model(s) {', '.join(waiting)} not ready yet")
        return web.Response(status=200)


class ProxyThread:
    """The proxy on its own event loop in a daemon thread: ``start()`` returns once it listens."""

    def __init__(self, host: str, port: int, proxy: Proxy):
        self.host, self.port, self.proxy = host, port, proxy
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="surgeon-serve-http", daemon=True)

    def start(self, timeout: float = 30.0) -> None:
        self._thread.start()
        if not self._started.wait(timeout):
            raise SurgeonError(f"the HTTP front end did not start on {self.host}:{self.port} in {timeout:.0f} s")
        if self._error is not None:
            err = self._error
            if isinstance(err, OSError):
                raise SurgeonError(f"cannot listen on {self.host}:{self.port}: {err.strerror or err}") from None
            raise err

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(10)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        from aiohttp import web

        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = web.Server(self.proxy.handle, access_log=None)
        runner = web.ServerRunner(server, handle_signals=False)
        try:
            await self.proxy.open()
            await runner.setup()
            await web.TCPSite(runner, self.host, self.port, reuse_address=True).start()
        except BaseException as exc:  # noqa: BLE001 - handed to start()'s caller
            self._error = exc
            self._started.set()
            await runner.cleanup()
            await self.proxy.close()
            return
        self._started.set()
        try:
            await self._stop.wait()
        finally:
            await runner.cleanup()
            await self.proxy.close()
