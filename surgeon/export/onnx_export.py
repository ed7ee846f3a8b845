"""``grown.pt`` → ONNX: one file with a dynamic batch, stable names, metadata and GrowNorm nodes.

Every export is verified against PyTorch with ONNX Runtime before it is written (atomically); a
model that misses its tolerance is never written.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from surgeon import __version__
from surgeon.checkpoint import Checkpoint, read_checkpoint
from surgeon.collect import young_collections
from surgeon.errors import SurgeonError, first_line
from surgeon.export import grownorm_op
from surgeon.export.lean import LeanModel
from surgeon.export.onnx_io import set_metadata  # noqa: F401  (re-exported: callers set metadata through the exporter)
from surgeon.export.verify import FP32_TOLERANCE, Verification, torch_reference, verify
from surgeon.grow.recipe import recipe_to_json
# BatchRange, the names and the opset range live in surgeon.spec (torch-free: trt/ and the CLI import
# them); re-exported here for callers of the exporter.
from surgeon.spec import DEFAULT_OPSET, INPUT_NAME, MAX_OPSET, MIN_OPSET, OUTPUT_NAME, PRECISIONS, BatchRange  # noqa: F401


@dataclass
class ExportResult:
    path: Path | None
    model: LeanModel   # the written model; ``model.to_proto()`` for an in-memory ModelProto
    verifications: list[Verification] = field(default_factory=list)
    passes: list[dict] = field(default_factory=list)   # per pass: changed, skipped (with reasons)
    ops_before: dict[str, int] = field(default_factory=dict)
    ops_after: dict[str, int] = field(default_factory=dict)
    quantization: Any = None   # a QuantizeResult for --precision int8 (surgeon.export.quantize)

    @property
    def grownorm_nodes(self) -> int:
        return self.ops_after.get(f"{grownorm_op.DOMAIN}::{grownorm_op.OP_TYPE}", 0)


def op_counts(model: LeanModel | onnx.ModelProto) -> dict[str, int]:
    proto = model.proto if isinstance(model, LeanModel) else model
    counts: dict[str, int] = {}
    for n in proto.graph.node:
        key = f"{n.domain}::{n.op_type}" if n.domain else n.op_type
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def metadata(ckpt: Checkpoint) -> dict[str, str]:
    """What runtimes need to use the model without the checkpoint: classes, preprocessing, recipe."""
    return {
        "surgeon_version": __version__,
        "surgeon.classes": json.dumps(ckpt.classes),
        "surgeon.preprocessing": json.dumps(ckpt.preprocessing.to_dict()),
        "surgeon.recipe": json.dumps(recipe_to_json(ckpt.recipe)),
        "surgeon.base_model": ckpt.model,
        "surgeon.base_weights": ckpt.weights,
        "surgeon.input": INPUT_NAME,
        "surgeon.output": OUTPUT_NAME,
        "surgeon.precision": "fp32",
    }


def to_onnx(model: nn.Module, input_size: int, opset: int = DEFAULT_OPSET, batch: BatchRange = BatchRange()) -> LeanModel:
    """Export an eval-mode model with GrowNorm as ``surgeon::GrowNorm`` nodes plus the local function.
    The large tensors of the result are views of ``model``'s parameters (no copy)."""
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise SurgeonError(f"--opset {opset} is not supported; use {MIN_OPSET}..{MAX_OPSET}")
    model = model.eval()
    # torch.export specializes a dimension of size 1, so the example batch is at least 2.
    example = torch.randn(max(2, min(batch.opt, 4)), 3, input_size, input_size)
    quiet = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(quiet), grownorm_op.registered_schema():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model, (example,), dynamo=True, verbose=False, opset_version=opset,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=max(batch.max, 2))},),
                custom_translation_table={torch.ops.surgeon.grow_norm.default: grownorm_op.onnx_translation},
            )
    except Exception as exc:
        first = next((ln for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise SurgeonError(f"torch.onnx.export failed: {first[:300]}") from None
    lean = LeanModel.from_ir(program.model)
    del program
    proto = lean.proto
    if any(n.domain == grownorm_op.DOMAIN for n in proto.graph.node):
        proto.functions.append(grownorm_op.grownorm_function())
    if not any(o.domain == grownorm_op.DOMAIN for o in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid(grownorm_op.DOMAIN, 1))
    proto.producer_name, proto.producer_version = "surgeon", __version__
    return lean


def _import_exporter_meanwhile() -> threading.Thread:
    """torch.onnx.export imports onnxscript's torch library on its first call (~0.5 s of Python).
    Imported on a thread from here, that overlaps reading the checkpoint and the PyTorch reference,
    whose convolutions run outside the GIL. A failed import is left to torch.onnx.export to report.
    (torch.export's tracer, the other 0.4 s of first-call imports, made the export slower this way.)"""

    def load() -> None:
        with contextlib.suppress(Exception):
            import onnxscript.function_libs.torch_lib.ops  # noqa: F401

    thread = threading.Thread(target=load, name="surgeon-import-exporter", daemon=True)
    thread.start()
    return thread


def save_onnx(model: LeanModel | onnx.ModelProto, path: str | Path) -> Path:
    """Atomic write; models over 2 GB keep their tensors in ``<path>.data``."""
    lean = model if isinstance(model, LeanModel) else LeanModel.from_proto(model)
    return lean.save(path)[0]


@young_collections()  # its collections free the traced model and replaced weights, not rescan torch's heap
def export_checkpoint(grown: str | Path, output: str | Path | None = None, *, opset: int = DEFAULT_OPSET,
                      trust_code: bool = False, calib: str | None = None, tolerance: float | None = None,
                      fold: bool = True, precision: str = "fp32", batch: BatchRange = BatchRange(),
                      quantization: Any = None) -> ExportResult:
    """Export ``grown.pt`` to ONNX, run the graph passes (``fold=False``: cleanup only), verify
    against PyTorch after export and after every pass that changed the graph, and write the result
    (next to the checkpoint as ``model.onnx`` unless ``output`` is given). ``precision="fp16"``
    converts the verified fp32 graph (GrowNorm stays fp32) and verifies it at the fp16 tolerance.
    ``precision="int8"`` quantizes the verified, folded fp32 graph (so the folded weights are what
    is quantized) with ``quantization`` (a :class:`~surgeon.export.quantize.QuantizeOptions`;
    default: its defaults on the ``calib`` images) and writes it only if it agrees with fp32."""
    from surgeon.export.fp16 import FP16_TOLERANCE, to_fp16
    from surgeon.export.incremental import IncrementalVerifier
    from surgeon.export.passes import default_passes
    from surgeon.export.passes.base import summarize

    if precision not in PRECISIONS:
        raise SurgeonError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "int8":
        from surgeon.export.quantize import QuantizeOptions

        if quantization is None and calib is None:
            raise SurgeonError("--precision int8 needs --calib DIR: images to calibrate the int8 ranges on "
                               "(part of them is held out to measure agreement with fp32)")
        quantization = quantization or QuantizeOptions(str(calib))
        quantization.check()
    exporter = _import_exporter_meanwhile()
    # One copy of the weights all the way: the checkpoint's tensors become the model's parameters (no
    # weight is initialized), the exported graph views them, and a pass that rewrites a tensor frees
    # the old one (the model is dropped below). Not memory-mapped: a mapping lives until its last
    # tensor does, so replaced weights would stay resident.
    ckpt = read_checkpoint(grown)
    model = ckpt.build_model(trust_code=trust_code, share_weights=True)
    out = Path(output) if output else Path(grown).with_name("model.onnx")
    reference = torch_reference(model, ckpt.preprocessing, calib=calib, batches=batch.verify_batches(),
                                max_batch=batch.max)
    exporter.join()
    lean = to_onnx(model, ckpt.preprocessing.input_size, opset, batch)
    set_metadata(lean.proto, {**metadata(ckpt), "surgeon.batch": str(batch)})
    del model
    ckpt.state_dict = {}
    gc.collect()  # the traced model is cyclic: free it (and the tensors only it held) now
    try:
        lean.check()
    except onnx.checker.ValidationError as exc:
        raise SurgeonError(f"the exported model is not valid ONNX: {first_line(exc)}") from None
    fp32_tol = FP32_TOLERANCE if tolerance is None else tolerance
    # The whole model once; after each pass only the part it changed (fed with the export run's values).
    verifier = IncrementalVerifier(reference, fp32_tol)
    checks = verifier.export(lean)
    before = op_counts(lean)

    def after_pass(name: str, candidate: LeanModel) -> None:
        checks.extend(verifier.stage(name, candidate))

    lean, results = default_passes(fold).run(lean, after_each=after_pass)
    if precision == "fp16":
        lean = to_fp16(lean)
        set_metadata(lean.proto, {"surgeon.precision": "fp16"})
        checks.extend(verify(lean, reference, stage="fp16", tolerance=FP16_TOLERANCE if tolerance is None else tolerance))
    quantized = None
    if precision == "int8":
        from surgeon.export.quantize import quantize_model

        quantized = quantize_model(lean, quantization, source=str(grown))
        lean = quantized.model
        lean.check()
    lean.save(out)
    if quantized is not None:
        quantized.path = out
    return ExportResult(out, lean, checks, summarize(results), before, op_counts(lean), quantized)
