"""``surgeon build``: ONNX → TensorRT engine; the same options serve ``surgeon export --trt``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from surgeon.commands.common import CONTEXT, friendly_errors
from surgeon.spec import BUILDERS, PLUGIN_CHOICES, PRECISIONS, BatchRange


def engine_options(fn):
    """Options every engine build takes (``surgeon build`` and ``surgeon export --trt``)."""
    options = [
        click.option("--plugin", type=click.Choice(PLUGIN_CHOICES), default="auto", show_default=True,
                     help="GrowNorm as the surgeon::GrowNorm plugin (auto: where TensorRT can load it; on: required; "
                          "off: the model's ONNX function)."),
        click.option("--timing-cache", type=click.Path(dir_okay=False), default=None,
                     help="TensorRT timing cache file, reused and updated across builds."),
        click.option("--workspace", "workspace_mb", type=int, default=None, help="Builder workspace limit in MB."),
        click.option("--builder", type=click.Choice(BUILDERS), default="auto", show_default=True,
                     help="auto: TensorRT with a CUDA GPU, else TensorRT-RTX (CPU-only, ahead of time)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def print_engine_report(report, report_path: str | None = None) -> None:
    from surgeon.fileio import atomic_write_text

    for line in report.summary():
        click.echo(f"  {line}")
    if report.ahead_of_time:
        click.echo("  note: built CPU-only with TensorRT-RTX; run it on an RTX-class GPU with the TensorRT-RTX runtime")
    if report_path:
        atomic_write_text(report_path, json.dumps(report.to_dict(), indent=2, ensure_ascii=False))


@click.command("build", context_settings=CONTEXT)
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Engine file to write [default: MODEL with the suffix .engine].")
@click.option("--batch", "batch_range", default=None,
              help=f"MIN:OPT:MAX batch sizes of the optimization profile [default: recorded at export, else {BatchRange()}].")
@click.option("--precision", type=click.Choice(PRECISIONS), default=None,
              help="Expected precision; TensorRT networks are strongly typed, so it must match the graph's.")
@engine_options
@click.option("--report", type=click.Path(dir_okay=False), default=None, help="Write the build report as JSON.")
@friendly_errors
def build(model: str, output: str | None, batch_range: str | None, precision: str | None, plugin: str,
          timing_cache: str | None, workspace_mb: int | None, builder: str, report: str | None) -> None:
    """Build a TensorRT engine from an exported ONNX file: one optimization profile over the batch,
    GrowNorm as the plugin or the model's ONNX function. With full TensorRT and a GPU it builds for
    that GPU; otherwise TensorRT-RTX builds CPU-only, ahead of time, for RTX-class GPUs.

    \b
    Example:
      surgeon build runs/wide/model.onnx --batch 1:8:32 --timing-cache ~/.cache/surgeon.timing
    """
    from surgeon.trt.build import build_engine

    result = build_engine(model, output, batch=BatchRange.parse(batch_range) if batch_range else None,
                          precision=precision, plugin=plugin, timing_cache=timing_cache, workspace_mb=workspace_mb,
                          builder=builder)
    click.echo(f"wrote {result.engine}")
    print_engine_report(result, report)


def engine_paths(output: str | None, default_onnx: Path) -> tuple[Path | None, Path | None]:
    """``export --trt -o X``: X names the engine when it ends in .engine/.plan (the ONNX goes beside
    it), else the ONNX (the engine goes beside it)."""
    if output and Path(output).suffix in (".engine", ".plan"):
        return Path(output).with_suffix(".onnx"), Path(output)
    onnx_path = Path(output) if output else default_onnx
    return onnx_path, onnx_path.with_suffix(".engine")



