"""``surgeon predict`` and ``surgeon bench``: use and measure any artifact."""

from __future__ import annotations

import json
import sys

import click

from surgeon.commands.common import CONTEXT, friendly_errors
from surgeon.spec import BACKENDS, DEFAULT_MAX_IMAGE_PIXELS

_BACKEND = click.Choice(BACKENDS)


@click.command("predict", context_settings=CONTEXT)
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("images", nargs=-1, required=True)
@click.option("--topk", type=int, default=5, show_default=True, help="Classes to show per image.")
@click.option("--backend", type=_BACKEND, default="auto", show_default=True, help="Inference backend.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout instead of a table.")
@click.option("--trust-code", is_flag=True, help="Allow importing the user code a grown.pt was grown from.")
@click.option("--max-image-pixels", type=click.IntRange(min=0), default=DEFAULT_MAX_IMAGE_PIXELS, show_default=True,
              help="Refuse images with more pixels than this, before decoding them (0 = no limit).")
@friendly_errors
def predict(model: str, images: tuple[str, ...], topk: int, backend: str, as_json: bool, trust_code: bool,
            max_image_pixels: int) -> None:
    """Classify images (files, folders, glob patterns) with MODEL (.onnx, .engine/.plan or grown.pt).
    Unreadable images are reported by name and the rest still predicted; the exit code is 1 if any
    image could not be read.

    \b
    Example:
      surgeon predict runs/wide/model.onnx photos/ 'more/*.jpg' --topk 3
    """
    from surgeon.errors import DataError
    from surgeon.imageio import open_image
    from surgeon.runtime.session import Session, image_files

    session = Session(model, backend, trust_code=trust_code)
    files = image_files(images)
    results, errors = [], []
    for path in files:  # one by one: a corrupt file costs only its own prediction
        try:
            # Decoded here, not by the session, so that the pixel cap is this command's option.
            [top] = session.predict([open_image(path, max_pixels=max_image_pixels)], topk=topk)
        except DataError as exc:
            errors.append({"image": str(path), "error": str(exc).split("; fix or remove")[0]})
            click.echo(f"error: {errors[-1]['error']}", err=True)
            continue
        results.append({"image": str(path), "top": [p.to_dict() for p in top]})
        if not as_json:
            best = ", ".join(f"{p.label} {p.score:.3f}" for p in top)
            click.echo(f"{path}: {best}")
    if as_json:
        click.echo(json.dumps({"model": model, "backend": session.backend, "predictions": results, "errors": errors},
                              indent=2, ensure_ascii=False))
    if errors:
        sys.exit(1)


@click.command("bench", context_settings=CONTEXT)
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--vs", "other", type=click.Path(dir_okay=False), default=None,
              help="A second model to compare with (grown.pt for PyTorch eager, an unfolded ONNX, a plain network...).")
@click.option("--backend", type=_BACKEND, default="auto", show_default=True, help="Backend for MODEL.")
@click.option("--vs-backend", type=_BACKEND, default="auto", show_default=True, help="Backend for the --vs model.")
@click.option("--batch", "batches", default="1,8,32", show_default=True, help="Comma-separated batch sizes.")
@click.option("--warmup", type=int, default=5, show_default=True, help="Untimed calls per model and batch size.")
@click.option("--iters", type=int, default=50, show_default=True, help="Timed calls per model and batch size.")
@click.option("--threads", type=int, default=None, help="ONNX Runtime intra-op threads [default: ONNX Runtime's].")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the results as JSON.")
@click.option("--trust-code", is_flag=True, help="Allow importing the user code a grown.pt was grown from.")
@friendly_errors
def bench(model: str, other: str | None, backend: str, vs_backend: str, batches: str, warmup: int, iters: int,
          threads: int | None, json_path: str | None, trust_code: bool) -> None:
    """Latency (median, p90, p99) and throughput of MODEL, and of a second model side by side: the
    two run interleaved in one process, so their ratio is fair on a noisy machine.

    \b
    Example:
      surgeon bench runs/wide/model.onnx --vs runs/wide/grown.pt --batch 1,32 --iters 100
    """
    from tqdm import tqdm

    from surgeon.errors import SurgeonError
    from surgeon.fileio import atomic_write_text
    from surgeon.runtime.bench import bench as run_bench
    from surgeon.runtime.session import Session

    try:
        sizes = [int(b) for b in batches.split(",")]
    except ValueError:
        raise SurgeonError(f"--batch must be comma-separated integers, got {batches!r}") from None
    if not sizes or min(sizes) < 1 or warmup < 0 or iters < 1:
        raise SurgeonError("--batch sizes and --iters must be positive, --warmup not negative")
    sessions = [Session(model, backend, trust_code=trust_code, threads=threads)]
    if other:
        sessions.append(Session(other, vs_backend, trust_code=trust_code, threads=threads))
    try:
        with tqdm(total=len(sizes) * iters, desc="bench", unit="round", disable=None, leave=False) as bar:
            report = run_bench(sessions, sizes, warmup=warmup, iters=iters, progress=bar.update)
    except ValueError as exc:
        raise SurgeonError(str(exc)) from None
    click.echo(f"{'model':<40} {'backend':<9} {'batch':>5} {'median ms':>10} {'p90 ms':>9} {'p99 ms':>9} {'img/s':>9}")
    for run in report["runs"]:
        for r in run["results"]:
            click.echo(f"{r['model'][-40:]:<40} {r['backend']:<9} {r['batch']:>5} {r['median_ms']:>10.2f} "
                       f"{r['p90_ms']:>9.2f} {r['p99_ms']:>9.2f} {r['throughput']:>9.1f}")
        if "ratio" in run:
            click.echo(f"  batch {run['batch']}: {sessions[1].artifact.path.name} / {sessions[0].artifact.path.name} "
                       f"= {run['ratio']:.3f} (median latency)")
    if json_path:
        atomic_write_text(json_path, json.dumps(report, indent=2))
