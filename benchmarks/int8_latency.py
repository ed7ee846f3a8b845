"""ONNX Runtime (CPU) latency of INT8 Q/DQ models (``surgeon quantize``) against their fp32 export
(issue 14): grown ResNet18 (``layer4.1.conv1`` +64) and grown VGG11 (fc7, ``classifier.3``, +1024).

Both come from the real pipeline: ``onnx_latency.checkpoint`` (trace, apply_steps, a 100-class head,
γ ~ U(5, 15)), ``export_checkpoint`` with the default passes (γ folded), then
``surgeon.export.quantize.quantize_file`` for each ``--target`` (MinMax, per-channel symmetric int8
weights, GrowNorm and logits in float; tensorrt: symmetric int8 activations, ort-cpu: uint8
activations) on generated images (smooth
random colour images, ``tests/export/test_quantize.write_generated_images``: no pretrained weights or
data sets here, so agreement is with the fp32 model on held-out generated images). Two sessions per
file created A B B A, timed round-robin in alternating order (``onnx_latency.interleaved_medians``),
a side's time the mean of its sessions' medians.

    python benchmarks/int8_latency.py [--cases resnet18 vgg11] [--rounds 7] [--batches 1 32] [--images 128] [--json out.json]
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from onnx_latency import checkpoint, latency_parser, sessions_twice, side_medians  # sibling scripts (benchmarks/ is on sys.path)

from surgeon import onnxrt
from surgeon.export.onnx_export import export_checkpoint
from surgeon.export.quantize import QuantizeOptions, quantize_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.export.test_quantize import write_generated_images  # noqa: E402

# The int8 files made of each fp32 export: name -> QuantizeOptions fields (int8_trained.py uses them too).
VARIANTS = {"tensorrt": {"target": "tensorrt"}, "ort-cpu": {"target": "ort-cpu"},
            "ort-cpu 7-bit": {"target": "ort-cpu", "reduce_range": True}}
CASES = {
    "resnet18": ("ResNet18 layer4.1.conv1 +64", "torchvision:resnet18", "layer4.1.conv1", 64),
    "vgg11": ("VGG11 fc7 classifier.3 +1024", "torchvision:vgg11", "classifier.3", 1024),
}


def cpu_flags() -> str:
    """The x86 instruction-set extensions that matter for int8 (VNNI dot products, AMX tiles)."""
    flags = onnxrt.cpu_flags()
    if flags is None:
        return "unknown"
    return " ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags) or "none of them"


def main() -> None:
    ap = latency_parser(__doc__, 7, [1, 32])
    ap.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    ap.add_argument("--images", type=int, default=128, help="generated images: half calibrate, half are held out")
    ap.add_argument("--block-s", type=float, default=0.5, help="seconds per timed block (runs per block from a trial)")
    args = ap.parse_args()
    print(f"ONNX Runtime {ort.__version__}, {args.threads} threads; CPU flags: {cpu_flags()}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        images = write_generated_images(d / "images", args.images, 224)
        for name in args.cases:
            label, arch, layer, units = CASES[name]
            t0 = time.perf_counter()
            fp32 = export_checkpoint(checkpoint(d / f"{name}.pt", arch, layer, units, norm=True), d / f"{name}.onnx").path
            exported_s = time.perf_counter() - t0
            files, held = {"fp32": fp32}, {}
            for i, variant in enumerate(VARIANTS):
                t1 = time.perf_counter()
                # min_agreement 0: agreement is measured and reported, not enforced (no per-layer search)
                q = quantize_file(fp32, d / f"{name}.int8-{i}.onnx",
                                  QuantizeOptions(str(images), min_agreement=0, **VARIANTS[variant]))
                files[variant], held[variant] = q.path, q.held_out
                a = q.held_out
                print(f"{label} / int8 {variant}: quantized in {time.perf_counter() - t1:.0f} s ({len(q.quantized)} int8 "
                      f"nodes, {q.calibration_images} calibration images); held-out {a.images}: top-1 agreement "
                      f"{a.top1:.4f}, max |err| {a.max_abs_err:.3g}, mean |err| {a.mean_abs_err:.3g} (logits' scale "
                      f"{a.scale:.3g}, median fp32 top-1 margin {a.margin:.3g}); fp32 exported in {exported_s:.0f} s", flush=True)
            sessions = sessions_twice(files, args.threads)
            for batch in args.batches:
                x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224), dtype=np.float32)
                med = side_medians(sessions, x, args.rounds, args.block_s)
                row = {"case": label, "batch": batch, **{f"{k}_ms": 1e3 * v for k, v in med.items()},
                       **{f"{t}_over_fp32": med[t] / med["fp32"] for t in held},
                       **{f"{t}_agreement": a.top1 for t, a in held.items()},
                       **{f"{t}_mean_abs_err": a.mean_abs_err for t, a in held.items()}, "held_out": held["tensorrt"].images}
                rows.append(row)
                ratios = "  ".join(f"int8 {t} {1e3 * med[t]:8.1f} ms = {med[t] / med['fp32']:.3f} x fp32 (agreement "
                                   f"{a.top1:.4f})" for t, a in held.items())
                print(f"  batch {batch:>2}: fp32 {1e3 * med['fp32']:8.1f} ms  {ratios}", flush=True)
            del sessions
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": args.threads, "ort": ort.__version__, "cpu_flags": cpu_flags(),
                                               "results": rows}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
