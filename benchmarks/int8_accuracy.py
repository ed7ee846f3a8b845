"""INT8 agreement and accuracy on a trained model (issue 14): the shipped DigitNet (``models/digitnet.pt``,
pretrained on scikit-learn's digits 0-4) with fc7 widened by 64 net2net units and GrowNorm, exported
(γ folded) and quantized with every calibration method, target and GrowNorm range choice.

Images: scikit-learn's 8x8 digits 0-4 as PNGs in class folders (``tests/export/test_quantize.write_digits``):
``--calib`` and ``--data`` are the same folder, so calibration takes half (at most ``--calib-samples``), agreement
is measured on the other half, and accuracy on all of it (these digits include DigitNet's own training
images: the accuracy is not a test accuracy; the int8 − fp32 difference is the figure).

    python benchmarks/int8_accuracy.py [--images 900] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from surgeon.export.onnx_export import export_checkpoint  # noqa: E402
from surgeon.export.quantize import QuantizeOptions, quantize_file  # noqa: E402
from surgeon.spec import CALIB_METHODS, GROWNORM_RANGES, QUANT_TARGETS  # noqa: E402
from tests.export.test_quantize import grown_digitnet, write_digits  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=900)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        images = write_digits(d / "digits", args.images)
        fp32 = export_checkpoint(grown_digitnet(d / "grown.pt"), d / "model.onnx").path
        for target in QUANT_TARGETS:
            for method in CALIB_METHODS:
                for ranges in GROWNORM_RANGES:
                    t0 = time.perf_counter()
                    r = quantize_file(fp32, d / "q.onnx", QuantizeOptions(str(images), method=method, target=target,
                                                                         grownorm_ranges=ranges, data=str(images),
                                                                         min_agreement=0))
                    a = r.held_out
                    row = {"target": target, "method": method, "grownorm_ranges": ranges, "held_out": a.images,
                           "calibration": r.calibration_images, "top1_agreement": a.top1, "max_abs_err": a.max_abs_err,
                           "mean_abs_err": a.mean_abs_err, "scale": a.scale, "margin": a.margin, **{
                               f"accuracy_{k}": v for k, v in r.accuracy.items() if k != "images"},
                           "accuracy_images": r.accuracy["images"], "seconds": time.perf_counter() - t0}
                    rows.append(row)
                    print(f"{target:<8} {method:<10} {ranges:<10} agreement {a.top1:.4f} on {a.images}  max |err| "
                          f"{a.max_abs_err:.2e}  mean |err| {a.mean_abs_err:.2e}  (scale {a.scale:.3g}, margin {a.margin:.3g})  "
                          f"accuracy fp32 {r.accuracy['fp32']:.4f} int8 {r.accuracy['int8']:.4f} on {r.accuracy['images']}  "
                          f"{row['seconds']:.1f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    sys.exit(main())
