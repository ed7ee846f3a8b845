"""``surgeon export`` and ``surgeon verify``: grown.pt → verified ONNX."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import click

from surgeon.collect import young_collections
from surgeon.commands.build import engine_options, engine_paths, print_engine_report
from surgeon.commands.common import CONTEXT, friendly_errors
from surgeon.commands.quantize import make_options, print_quantize_report, quantize_options
from surgeon.spec import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET, PRECISIONS, BatchRange


def _print_checks(checks) -> None:
    # The tolerance bounds the error relative to the logits' scale (max |torch|), not |err| itself.
    for c in checks:
        click.echo(f"  {c.stage:<15} {c.inputs:<20} batch {c.batch:>3}  max |err| {c.max_abs_err:.2e} = {c.rel_err:.1e} "
                   f"of the logits' scale (tolerance {c.tolerance:.0e} of scale): {'ok' if c.ok else 'FAIL'}")


def _ops(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items())


def _print_passes(passes: list[dict]) -> None:
    for p in passes:
        for change in p["changed"]:
            click.echo(f"  {p['pass']:<15} done     {change['candidate']}: {change['done']}")
        for skip in p["skipped"]:
            click.echo(f"  {p['pass']:<15} skipped  {skip['candidate']}: {skip['reason']}")


@click.command("export", context_settings=CONTEXT)
@click.argument("grown", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="ONNX file to write [default: model.onnx next to GROWN].")
@click.option("--opset", type=int, default=DEFAULT_OPSET, show_default=True, help=f"ONNX opset ({MIN_OPSET}-{MAX_OPSET}).")
@click.option("--calib", type=click.Path(file_okay=False), default=None,
              help="Folder of real images to verify on, besides random inputs (with --precision int8: to calibrate on).")
@click.option("--batch", "batch_range", default=str(BatchRange()), show_default=True,
              help="MIN:OPT:MAX batch sizes to serve (recorded for engine builds; verified at MIN and up to 5).")
@click.option("--precision", type=click.Choice(PRECISIONS), default=PRECISIONS[0], show_default=True,
              help="fp16: fp16 weights and activations, GrowNorm in fp32, I/O stays fp32 (verified at 1e-2). int8: "
                   "the folded graph quantized with --calib (see `surgeon quantize`), written only at --min-agreement.")
@quantize_options
@click.option("--no-fold", is_flag=True, help="Skip fold-gamma and merge-parallel (keep the grown structure; cleanup still runs).")
@click.option("--report", type=click.Path(dir_okay=False), default=None,
              help="Write the passes' report (every candidate, what was done or why not) and the checks as JSON.")
@click.option("--trust-code", is_flag=True, help="Allow importing the user code the checkpoint was grown from.")
@click.option("--trt", is_flag=True, help="Also build a TensorRT engine (see `surgeon build`); -o may then name the .engine.")
@engine_options
@click.option("--triton-repo", type=click.Path(file_okay=False), default=None,
              help="Also write a Triton Inference Server model repository (config.pbtxt, labels, the model) here.")
@click.option("--triton-name", default=None, help="Model name in --triton-repo [default: the checkpoint's folder name].")
@friendly_errors
def export(grown: str, output: str | None, opset: int, calib: str | None, batch_range: str, precision: str,
           calib_samples: int, calib_method: str, target: str, reduce_range: bool, grownorm_ranges: str,
           min_agreement: float, exclude: tuple[str, ...], force: bool, data: str | None, no_fold: bool,
           report: str | None, trust_code: bool, trt: bool, plugin: str, timing_cache: str | None,
           workspace_mb: int | None, builder: str, triton_repo: str | None, triton_name: str | None) -> None:
    """Export a grown checkpoint to ONNX: dynamic batch, inputs `images` → `logits`, class names and
    preprocessing in the metadata, each GrowNorm one `surgeon::GrowNorm` node backed by a local
    function (ONNX Runtime runs the file as is). The file is written only after ONNX Runtime matches
    PyTorch (relative error ≤ 1e-4 of the logits' scale).

    \b
    Example:
      surgeon export runs/wide/grown.pt -o runs/wide/model.onnx --calib ~/data/flowers/val
      surgeon export runs/wide/grown.pt --trt --precision fp16 --batch 1:8:32
      surgeon export runs/wide/grown.pt --triton-repo model_repository --triton-name flowers
      surgeon export runs/wide/grown.pt --precision int8 --calib ~/data/flowers/val -o runs/wide/model.int8.onnx
    """
    from surgeon.export.onnx_export import export_checkpoint
    from surgeon.fileio import atomic_write_text

    triton_model = _triton_model_name(triton_name, grown) if triton_repo else None  # before any write
    quantization = None
    if precision == "int8":
        if calib is None:
            raise click.UsageError("--precision int8 needs --calib DIR (images to calibrate on)")
        if trt and target != "tensorrt":
            raise click.UsageError(f"--trt needs --target tensorrt (TensorRT does not take --target {target})")
        quantization = make_options(calib, calib_samples, calib_method, target, reduce_range, grownorm_ranges,
                                    min_agreement, exclude, force, data)
    elif exclude or force or data or target != "tensorrt" or reduce_range:
        raise click.UsageError("--exclude, --force, --data, --target and --reduce-range are options of --precision int8")
    engine = None
    if trt:
        from surgeon.trt.build import choose_grownorm
        from surgeon.trt.toolkit import find_toolkit

        if plugin == "on":  # fail before the export if the engine cannot be built as asked
            choose_grownorm(find_toolkit(builder), plugin, nodes=1)
        else:
            find_toolkit(builder)
        output, engine = (str(p) for p in engine_paths(output, Path(grown).with_name("model.onnx")))
    result = export_checkpoint(grown, output, opset=opset, trust_code=trust_code, calib=calib, fold=not no_fold,
                               precision=precision, batch=BatchRange.parse(batch_range), quantization=quantization)
    click.echo(f"wrote {result.path} ({precision}, {result.grownorm_nodes} GrowNorm node(s), opset {opset})")
    _print_passes(result.passes)
    click.echo(f"  ops before passes: {_ops(result.ops_before)}")
    click.echo(f"  ops after passes:  {_ops(result.ops_after)}")
    _print_checks(result.verifications)
    if result.quantization is not None:
        print_quantize_report(result.quantization)
    built = None
    if engine:
        from surgeon.trt.build import build_engine

        built = build_engine(result.path, engine, batch=BatchRange.parse(batch_range), plugin=plugin,
                             timing_cache=timing_cache, workspace_mb=workspace_mb, builder=builder)
        click.echo(f"wrote {built.engine}")
        print_engine_report(built)
    if triton_repo:
        from surgeon.runtime.triton_repo import write_repository

        folder, note = write_repository(triton_repo, result.path, engine=built.engine if built else None,
                                        name=triton_model)
        click.echo(f"wrote Triton model repository {folder}" + (f" ({note})" if note else ""))
    if report:
        atomic_write_text(report, json.dumps({
            "onnx": str(result.path), "grownorm_nodes": result.grownorm_nodes, "passes": result.passes,
            "ops_before": result.ops_before, "ops_after": result.ops_after,
            "verification": [c.__dict__ | {"ok": c.ok} for c in result.verifications],
            **({"quantization": result.quantization.to_dict()} if result.quantization else {}),
            **({"engine": built.to_dict()} if built else {})}, indent=2, ensure_ascii=False))


@click.command("verify", context_settings=CONTEXT)
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--against", "grown", required=True, type=click.Path(dir_okay=False), help="The grown.pt it was exported from.")
@click.option("--data", "calib", type=click.Path(file_okay=False), default=None, help="Folder of real images to compare on.")
@click.option("--tolerance", type=float, default=None,
              help="Relative to the logits' scale [default: 1e-4, or 1e-2 for an fp16 file].")
@click.option("--trust-code", is_flag=True, help="Allow importing the user code the checkpoint was grown from.")
@friendly_errors
def verify(model: str, grown: str, calib: str | None, tolerance: float | None, trust_code: bool) -> None:
    """Check an ONNX file against the PyTorch checkpoint it came from, with ONNX Runtime (CPU).

    \b
    Example:
      surgeon verify runs/wide/model.onnx --against runs/wide/grown.pt --data ~/data/flowers/val
    """
    from surgeon.checkpoint import read_checkpoint
    from surgeon.export.fp16 import FP16_TOLERANCE
    from surgeon.export.onnx_io import load_onnx
    from surgeon.export.verify import FP32_TOLERANCE, torch_reference
    from surgeon.export.verify import verify as verify_onnx

    proto = load_onnx(model, load_external_data=False)  # the metadata; ONNX Runtime reads the file itself
    meta = {p.key: p.value for p in proto.metadata_props}
    if tolerance is None:
        tolerance = FP16_TOLERANCE if meta.get("surgeon.precision") == "fp16" else FP32_TOLERANCE
    batch = BatchRange.parse(meta["surgeon.batch"]) if "surgeon.batch" in meta else BatchRange()
    with young_collections():  # the collection frees the traced model without rescanning torch's heap
        ckpt = read_checkpoint(grown)
        reference = torch_reference(ckpt.build_model(trust_code=trust_code, share_weights=True), ckpt.preprocessing,
                                    calib=calib, batches=batch.verify_batches(), max_batch=batch.max)
        ckpt.state_dict = {}  # PyTorch's part is done: free its weights before ONNX Runtime loads the model's
        gc.collect()
    checks = verify_onnx(model, reference, stage="verify", tolerance=tolerance,
                         on_failure=f"{model} does not match {grown} (re-export it with `surgeon export`)")
    _print_checks(checks)
    click.echo(f"{model} matches {grown}")


def _triton_model_name(name: str | None, grown: str) -> str:
    """The model's name in ``--triton-repo`` (``--triton-name``, else the checkpoint's folder name),
    made a valid Triton name; checked before anything is written."""
    from surgeon.runtime.triton_repo import model_name

    return model_name(name if name is not None else (Path(grown).resolve().parent.name or Path(grown).stem))
