"""``surgeon quantize``: an fp32 ONNX → a calibrated INT8 Q/DQ ONNX; its options also serve
``surgeon export --precision int8``."""

from __future__ import annotations

import json

import click

from surgeon.commands.common import CONTEXT, friendly_errors
from surgeon.spec import CALIB_METHODS, DEFAULT_CALIB_SAMPLES, DEFAULT_MIN_AGREEMENT, GROWNORM_RANGES, QUANT_TARGETS


def quantize_options(fn):
    """What every INT8 quantization takes besides ``--calib`` (``surgeon quantize`` and ``surgeon
    export --precision int8``)."""
    options = [
        click.option("--calib-samples", type=int, default=DEFAULT_CALIB_SAMPLES, show_default=True,
                     help="Images of --calib to calibrate on (at most half of it); the rest is held out to measure agreement."),
        click.option("--calib-method", type=click.Choice(CALIB_METHODS), default=CALIB_METHODS[0], show_default=True,
                     help="How activation ranges are chosen from the calibration images (ONNX Runtime's calibrators)."),
        click.option("--target", type=click.Choice(QUANT_TARGETS), default=QUANT_TARGETS[0], show_default=True,
                     help="tensorrt: int8 activations with zero point 0 (TensorRT builds it; ONNX Runtime runs it too). "
                          "ort-cpu: uint8 activations, for ONNX Runtime's fast x86 kernels (TensorRT refuses it)."),
        click.option("--reduce-range", is_flag=True,
                     help="7-bit weights, for --target ort-cpu on x86 CPUs without VNNI (AVX2, AVX-512F): ONNX Runtime "
                          "keeps its fast int8 kernels there (8-bit weights run exactly but slower)."),
        click.option("--grownorm-ranges", type=click.Choice(GROWNORM_RANGES), default=GROWNORM_RANGES[0], show_default=True,
                     help="Ranges of GrowNorm outputs: calibrated, or gamma: |y| <= max|γ| by construction (no calibration). "
                          "The report compares both."),
        click.option("--min-agreement", type=float, default=DEFAULT_MIN_AGREEMENT, show_default=True,
                     help="Top-1 agreement with fp32 on the held-out images below which nothing is written."),
        click.option("--exclude", multiple=True, metavar="LAYER",
                     help="Keep this Conv/Gemm/MatMul in float: an ONNX node name, or a PyTorch module name (repeatable)."),
        click.option("--force", is_flag=True, help="Write the model even below --min-agreement (the report still says so)."),
        click.option("--data", type=click.Path(file_okay=False), default=None,
                     help="Labelled folder (DIR/<class>/<image>) to compare fp32 and int8 accuracy on."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def make_options(calib: str, calib_samples: int, calib_method: str, target: str, reduce_range: bool,
                 grownorm_ranges: str, min_agreement: float, exclude: tuple[str, ...], force: bool, data: str | None):
    from surgeon.export.quantize import QuantizeOptions

    options = QuantizeOptions(calib, calib_samples, calib_method, min_agreement, tuple(exclude), force, grownorm_ranges,
                              data, target, reduce_range)
    options.check()
    return options


def _agreement(a) -> str:
    return (f"top-1 agreement {a.top1:.4f}, max |err| {a.max_abs_err:.2e}, mean |err| {a.mean_abs_err:.2e} "
            f"(logits' scale {a.scale:.3g}, median top-1 margin {a.margin:.3g})")


def print_quantize_report(result) -> None:
    n_quant = len(result.quantized)
    acts = "int8 inputs" if result.target == "tensorrt" else "uint8 inputs"
    weights = "int8 weights (per-channel)" if result.weight_bits == 8 else "7-bit int8 weights (per-channel, --reduce-range)"
    click.echo(f"  int8      {n_quant} Conv/Gemm/MatMul node(s) with {acts} and {weights}, GrowNorm and "
               f"the logits in float, for {result.target}; {result.method} calibration on {result.calibration_images} image(s)")
    click.echo(f"  held out  {result.held_out.images} image(s): {_agreement(result.held_out)}")
    if result.alternative is not None:
        other = "gamma" if result.grownorm_ranges == "calibrated" else "calibrated"
        click.echo(f"  GrowNorm  ranges {result.grownorm_ranges} (used): agreement {result.held_out.top1:.4f}, mean |err| "
                   f"{result.held_out.mean_abs_err:.2e}; {other}: agreement {result.alternative.top1:.4f}, mean |err| "
                   f"{result.alternative.mean_abs_err:.2e}")
        for r in result.ranges:
            groups = ", ".join(f"{m:.3g}" for m in r.group_max)
            click.echo(f"            {r.tensor} (from {r.grownorm}): calibrated |v| <= {r.calibrated:.3g}, bound from γ "
                       f"{r.gamma_bound:.3g}; per group (old first) max |y| {groups}")
    if result.target == "ort-cpu" and result.weight_bits == 8:
        from surgeon.onnxrt import u8s8_saturates

        if u8s8_saturates():
            click.echo("  note      this x86 CPU has no VNNI: ONNX Runtime runs 8-bit weights here with exact but slower "
                       "kernels; --reduce-range (7-bit weights) keeps its fast ones")
    if result.accuracy:
        acc = result.accuracy
        click.echo(f"  accuracy  {acc['images']} labelled image(s): fp32 {acc['fp32']:.4f}, int8 {acc['int8']:.4f}")
    if result.excluded:
        click.echo(f"  float     {', '.join(result.excluded)} (--exclude)")
    if result.below_min_agreement:
        worst = ", ".join(f"{r['layer']} ({r['mean_abs_err']:.2e})" for r in result.sensitivity[:3])
        click.echo(f"  warning   written below --min-agreement (--force); layers that hurt most, quantized alone: {worst}")


@click.command("quantize", context_settings=CONTEXT)
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--calib", required=True, type=click.Path(file_okay=False),
              help="Folder of images like the ones the model will see (recursively; labels not needed).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="INT8 ONNX file to write [default: MODEL with the suffix .int8.onnx].")
@quantize_options
@click.option("--report", type=click.Path(dir_okay=False), default=None, help="Write the quantization report as JSON.")
@friendly_errors
def quantize(model: str, calib: str, output: str | None, calib_samples: int, calib_method: str, target: str,
             reduce_range: bool, grownorm_ranges: str, min_agreement: float, exclude: tuple[str, ...], force: bool,
             data: str | None, report: str | None) -> None:
    """Quantize an exported fp32 ONNX to INT8 with explicit Quantize/Dequantize nodes (what TensorRT's
    strongly typed networks and ONNX Runtime run): per-channel symmetric int8 weights and per-tensor
    8-bit inputs for every Conv/Gemm/MatMul, calibrated on part of --calib; GrowNorm stays float.
    Agreement with the fp32 model is measured on the rest of --calib, and the file is written only
    at --min-agreement or above.

    \b
    Example:
      surgeon quantize runs/wide/model.onnx --calib ~/data/flowers/val -o runs/wide/model.int8.onnx
      surgeon quantize model.onnx --calib imgs --calib-method percentile --exclude classifier.6 --data ~/data/flowers/val
    """
    from pathlib import Path

    from surgeon.export.quantize import quantize_file
    from surgeon.fileio import atomic_write_text

    options = make_options(calib, calib_samples, calib_method, target, reduce_range, grownorm_ranges, min_agreement, exclude,
                           force, data)
    out = Path(output) if output else Path(model).with_suffix(".int8.onnx")
    result = quantize_file(model, out, options)
    click.echo(f"wrote {result.path}")
    print_quantize_report(result)
    if report:
        atomic_write_text(report, json.dumps(result.to_dict(), indent=2, ensure_ascii=False))
