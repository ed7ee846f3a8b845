"""Q/DQ at residual Adds (issue 14), A/B on a trained grown ResNet18: agreement and ONNX Runtime CPU
latency with and without each placement, from one fp32 export and one calibration folder.

- ``tensorrt``: ``fuse_residual_adds`` (TensorRT's placement: the residual input of each Add
  quantized, the conv output it is added to in float, so the conv and the add fuse) against ONNX
  Runtime's default placement (a Q/DQ pair on every conv output, the Add's inputs both dequantized);
- ``ort-cpu``: the residual Adds quantized too (``Add`` among the quantized op types: inputs and
  output, which ONNX Runtime runs as QLinearAdd) against Conv/Gemm/MatMul only.

Files: the ``--keep`` folder of ``int8_trained.py`` (its ``resnet18.onnx`` at the trained size and
``resnet18.224.onnx``, the same weights at 224 px, and ``digits/calib``, ``digits/test``). Sessions
twice each, A B B A, timed round-robin (``onnx_latency.side_medians``).

    python benchmarks/int8_residual_add.py build/int8_trained [--rounds 7] [--batches 1 32] [--json out.json]
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import onnx

from onnx_latency import latency_parser, sessions_twice, side_medians  # sibling scripts (benchmarks/ is on sys.path)

import surgeon.export.quantize as quantize
from surgeon.export.quantize import QuantizeOptions, quantize_file

VARIANTS = {
    "tensorrt": ("tensorrt", {}),
    "tensorrt, Q/DQ on every conv output (ONNX Runtime's default)": ("tensorrt", {"fuse_residual_adds": lambda proto: []}),
    "ort-cpu": ("ort-cpu", {}),
    "ort-cpu, residual Adds quantized (QLinearAdd)": ("ort-cpu", {"OP_TYPES": (*quantize.OP_TYPES, "Add")}),
}


def main() -> None:
    ap = latency_parser(__doc__, 7, [1, 32])
    ap.add_argument("folder")
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--block-s", type=float, default=0.5)
    args = ap.parse_args()
    d = Path(args.folder)
    calib, test = d / "digits" / "calib", d / "digits" / "test"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for fp32 in (d / f"{args.model}.onnx", d / f"{args.model}.224.onnx"):
            size = onnx.load(fp32, load_external_data=False).graph.input[0].type.tensor_type.shape.dim[-1].dim_value
            files = {"fp32": fp32}
            for i, (label, (target, patch)) in enumerate(VARIANTS.items()):
                with mock.patch.multiple(quantize, **patch) if patch else contextlib.nullcontext():
                    q = quantize_file(fp32, Path(tmp) / f"{size}.{i}.onnx",
                                      QuantizeOptions(str(calib), target=target, data=str(test), min_agreement=0))
                ops = [n.op_type for n in onnx.load(q.path).graph.node]
                print(f"{size}px {label}: agreement {q.held_out.top1:.4f} on {q.held_out.images}, mean |err| "
                      f"{q.held_out.mean_abs_err:.3g}, accuracy int8 {q.accuracy['int8']:.4f} (fp32 {q.accuracy['fp32']:.4f}); "
                      f"{ops.count('QuantizeLinear')} Q, {ops.count('DequantizeLinear')} DQ", flush=True)
                rows.append({"size": size, "variant": label, "agreement": q.held_out.top1,
                             "mean_abs_err": q.held_out.mean_abs_err, "accuracy": q.accuracy})
                files[label] = q.path
            sessions = sessions_twice(files, args.threads)
            for batch in args.batches:
                x = np.random.default_rng(0).standard_normal((batch, 3, size, size), dtype=np.float32)
                med = side_medians(sessions, x, args.rounds, args.block_s)
                for label in VARIANTS:
                    print(f"  {size}px batch {batch:>2}: {label}: {med[label] / med['fp32']:.3f} x fp32", flush=True)
                    rows.append({"size": size, "batch": batch, "variant": label, "over_fp32": med[label] / med["fp32"]})
            del sessions
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    sys.exit(main())
