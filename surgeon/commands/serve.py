"""``surgeon serve``: a model behind Triton Inference Server (KServe v2, HTTP + gRPC), through PyTriton."""

from __future__ import annotations

import click

from surgeon.commands.common import CONTEXT, friendly_errors
from surgeon.spec import BACKENDS
from surgeon.spec import DEFAULT_MAX_IMAGE_PIXELS as MAX_IMAGE_PIXELS  # not runtime.serve: that imports PyTriton

_BACKEND = click.Choice(BACKENDS)


@click.command("serve", context_settings=CONTEXT)
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0 for all).")
@click.option("--port", type=int, default=8000, show_default=True,
              help="HTTP port; gRPC listens on PORT+1, Prometheus metrics on PORT+2.")
@click.option("--max-batch", type=int, default=32, show_default=True, help="Largest batch Triton forms or accepts.")
@click.option("--max-queue-delay-us", type=int, default=500, show_default=True,
              help="How long Triton's dynamic batcher may hold a request to batch it with others (0: no waiting).")
@click.option("--backend", type=_BACKEND, default="auto", show_default=True, help="Inference backend.")
@click.option("--name", default=None, help="Model name [default: MODEL's file name without suffix].")
@click.option("--max-image-bytes", type=int, default=16 << 20, show_default=True,
              help="Largest encoded image the NAME_image model accepts (larger: HTTP 400).")
@click.option("--max-image-pixels", type=int, default=MAX_IMAGE_PIXELS, show_default=True,
              help="Largest decoded image (width x height) the NAME_image model decodes (larger: HTTP 400).")
@click.option("--trust-code", is_flag=True, help="Allow importing the user code a grown.pt was grown from.")
@friendly_errors
def serve(model: str, host: str, port: int, max_batch: int, max_queue_delay_us: int, backend: str, name: str | None,
          max_image_bytes: int, max_image_pixels: int, trust_code: bool) -> None:
    """Serve MODEL (.onnx, .engine/.plan or grown.pt) on Triton Inference Server with dynamic batching:
    model NAME takes preprocessed FP32 tensors `images` [3,S,S] and returns `logits`; model NAME_image
    takes encoded image files (BYTES `image` [1]) and returns `logits`, `label` and `score`. Health:
    /v2/health/ready (200 once both models are ready); metrics on PORT+2. An HTTP request body over
    its model's limit (from --max-batch and the input size; printed at start) gets 413 unread.
    Exits 1 if Triton dies, so a supervisor can restart it. Needs the `serve` extra:
    pip install 'surgeon[serve]'.

    \b
    Example:
      surgeon serve runs/wide/model.onnx --port 8000 --max-batch 32 --name flowers
      curl -s localhost:8000/v2/health/ready && curl -s localhost:8000/v2/models/flowers
    """
    from surgeon.runtime.serve import serve as run_serve

    run_serve(model, host=host, port=port, max_batch=max_batch, max_queue_delay_us=max_queue_delay_us,
              backend=backend, name=name, max_image_bytes=max_image_bytes, max_image_pixels=max_image_pixels,
              trust_code=trust_code, on_ready=lambda line: click.echo(f"surgeon serve: {line}", err=True))
