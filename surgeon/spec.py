"""Plain values and types the training side and the deploy side share: batch ranges, precisions,
opsets, backend, builder and plugin choices.

Pure Python (no torch, numpy or onnx), so the CLI builds its ``--help`` from these without loading
any framework, and ``surgeon build`` / ``Session`` use them without PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass

from surgeon.errors import SurgeonError

# Decoded-pixel cap for predict, serve and training data. 64 M pixels is ~190 MB as RGB: any photo
# (a 50 MP camera is 8688x5792) passes, a 12000x12000 decompression bomb does not.
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000
PRECISIONS = ("fp32", "fp16", "int8")
MIN_OPSET, MAX_OPSET = 18, 23
DEFAULT_OPSET = 18
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
# surgeon quantize / export --precision int8: calibration (ONNX Runtime's calibrators), the images used
# to calibrate (the rest of --calib is held out to measure agreement), the agreement a model needs to
# be written, and where GrowNorm outputs' ranges come from ("gamma": |y_c| <= |gamma_c|, no calibration).
CALIB_METHODS = ("minmax", "entropy", "percentile")
DEFAULT_CALIB_SAMPLES = 256
DEFAULT_MIN_AGREEMENT = 0.99
GROWNORM_RANGES = ("calibrated", "gamma")
# Who runs the int8 file: TensorRT (int8 activations with zero point 0; ONNX Runtime runs it too) or
# ONNX Runtime on a CPU (uint8 activations, its fast x86 kernels; TensorRT refuses the zero points).
QUANT_TARGETS = ("tensorrt", "ort-cpu")
# Session / predict / bench / serve backends; "auto" picks by file.
BACKENDS = ("auto", "ort-cpu", "ort-cuda", "ort-trt", "trt", "torch")
# surgeon build --builder: which TensorRT builds the engine.
BUILDERS = ("auto", "tensorrt", "tensorrt-rtx")
# surgeon build --plugin: GrowNorm as the TensorRT plugin (auto, required) or the ONNX function (off).
PLUGIN_CHOICES = ("auto", "on", "off")


@dataclass(frozen=True)
class BatchRange:
    """``--batch MIN:OPT:MAX``: the batch sizes the model must serve (an engine's optimization profile)."""

    min: int = 1
    opt: int = 8
    max: int = 64

    @classmethod
    def parse(cls, text: str) -> "BatchRange":
        try:
            lo, opt, hi = (int(v) for v in text.split(":"))
        except ValueError:
            raise SurgeonError(f"--batch must be MIN:OPT:MAX (three integers, e.g. 1:8:32), got {text!r}") from None
        if not 1 <= lo <= opt <= hi:
            raise SurgeonError(f"--batch needs 1 <= MIN <= OPT <= MAX, got {text!r}")
        return cls(lo, opt, hi)

    def __str__(self) -> str:
        return f"{self.min}:{self.opt}:{self.max}"

    def verify_batches(self) -> tuple[int, ...]:
        return tuple(sorted({self.min, min(self.max, max(self.min, 5))}))
