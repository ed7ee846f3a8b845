"""Numeric verification: ONNX Runtime (CPU) against PyTorch on the same inputs.

The error is measured relative to the scale of the logits — ``max|onnx − torch| / max|torch|`` —
so a tolerance means the same thing for every model. Random inputs always run (at two batch sizes,
which also checks the dynamic batch dimension); with ``calib`` a folder of real images runs too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from surgeon.errors import SurgeonError
from surgeon.export.lean import LeanModel
# The ONNX Runtime runner lives torch-free (surgeon quantize uses it without PyTorch); re-exported here.
from surgeon.export.ort_runner import OrtRunner  # noqa: F401
from surgeon.preprocessing import Preprocessing

FP32_TOLERANCE = 1e-4


@dataclass
class Verification:
    stage: str
    inputs: str
    batch: int
    max_abs_err: float
    rel_err: float
    tolerance: float
    # What ONNX Runtime ran: the whole model, or the part a pass changed, fed with the unchanged
    # tensors' values from the export stage's run (surgeon.export.incremental).
    ran: str = "whole model"

    @property
    def ok(self) -> bool:
        return self.rel_err <= self.tolerance


def _real_images(calib: str, pre: Preprocessing, limit: int = 32) -> torch.Tensor:
    from surgeon.imageio import IMAGE_EXTENSIONS, open_image
    from surgeon.preprocessing import EvalTransform

    root = Path(calib)
    if not root.is_dir():
        raise SurgeonError(f"--calib folder {root} does not exist")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))[:limit]
    if not files:
        raise SurgeonError(f"--calib folder {root} holds no images")
    transform = EvalTransform(pre)  # what validation in training and the deploy side apply
    return torch.stack([torch.from_numpy(transform(open_image(f))) for f in files])


def input_sets(pre: Preprocessing, calib: str | None, batches: tuple[int, ...] = (1, 5), seed: int = 0,
               max_batch: int | None = None) -> list[tuple[str, torch.Tensor]]:
    """Random inputs at each batch size (two sizes also exercise the dynamic batch dimension) and,
    with ``calib``, real images in chunks of at most ``max_batch``."""
    g = torch.Generator().manual_seed(seed)
    size = pre.input_size
    sets = [("random", torch.randn(b, 3, size, size, generator=g)) for b in batches]
    if calib:
        images = _real_images(calib, pre)
        step = max_batch or len(images)
        sets += [(f"images from {calib}", images[i:i + step]) for i in range(0, len(images), step)]
    return sets


def compare(reference: np.ndarray, actual: np.ndarray) -> tuple[float, float]:
    if reference.shape != actual.shape:
        raise SurgeonError(f"output shape {actual.shape} differs from PyTorch's {reference.shape}")
    err = float(np.max(np.abs(reference.astype(np.float64) - actual.astype(np.float64))))
    scale = max(float(np.max(np.abs(reference))), 1e-6)
    return err, err / scale


@dataclass
class Reference:
    """PyTorch's outputs on the verification inputs, computed once and compared at every stage."""

    cases: list[tuple[str, np.ndarray, np.ndarray]]   # (what, input, expected logits)


def torch_reference(model: nn.Module, pre: Preprocessing, *, calib: str | None = None,
                    batches: tuple[int, ...] = (1, 5), max_batch: int | None = None) -> Reference:
    model = model.eval()
    cases = []
    for what, x in input_sets(pre, calib, batches, max_batch=max_batch):
        with torch.no_grad():
            cases.append((what, x.numpy(), model(x).float().numpy()))
    _check_deterministic(model, cases[0])
    return Reference(cases)


def _check_deterministic(model: nn.Module, case: tuple[str, np.ndarray, np.ndarray]) -> None:
    """The same input twice must give the same logits: a model that is random at inference (dropout
    or stochastic depth frozen in training mode) cannot be verified, or deployed."""
    _, x, expected = case
    with torch.no_grad():
        again = model(torch.from_numpy(x)).float().numpy()
    _, rel = compare(expected, again)
    if rel > 1e-6:
        raise SurgeonError(f"PyTorch gives different logits for the same input twice in eval mode ({rel:.1e} of their "
                           "scale): the model is random at inference (dropout or stochastic depth applied regardless "
                           "of eval()?), so it cannot be verified")


NOT_WRITTEN = "the model was not written"


def verify(model: LeanModel | onnx.ModelProto | str | Path, reference: Reference, *, stage: str,
           tolerance: float = FP32_TOLERANCE, on_failure: str = NOT_WRITTEN) -> list[Verification]:
    """Raise SurgeonError (naming ``stage``, ending in ``on_failure``: what it means for the caller)
    unless ONNX Runtime matches the reference within ``tolerance`` of the logits' scale. ``model``: in
    memory, or a file's path (ONNX Runtime reads it, external data too, once checked)."""
    runner = OrtRunner(model)
    return check_cases(reference, lambda i, x: runner.run(x), stage=stage, tolerance=tolerance,
                       on_failure=on_failure, check_input=runner.check_input)


def check_cases(reference: Reference, run: Callable[[int, np.ndarray], np.ndarray], *, stage: str,
                tolerance: float, on_failure: str = NOT_WRITTEN,
                check_input: Callable[[np.ndarray], str | None] | None = None,
                ran: str = "whole model") -> list[Verification]:
    """Compare ``run(case index, input)`` with the reference's logits on every case; raise the first
    mismatch (or failure to run) as a SurgeonError naming ``stage``."""
    from surgeon.onnxrt import ort_errors, ort_message

    results = []
    for i, (what, x, expected) in enumerate(reference.cases):
        mismatch = check_input(x) if check_input is not None else None
        if mismatch:
            raise SurgeonError(f"{stage}: {mismatch}; {on_failure}")
        try:
            actual = run(i, x)
        except ort_errors() as exc:
            raise SurgeonError(f"{stage}: ONNX Runtime failed to run the model on {what} (batch {len(x)}): "
                               f"{ort_message(exc)}; {on_failure}") from None
        err, rel = compare(expected, actual)
        check = Verification(stage, what, len(x), err, rel, tolerance, ran)
        results.append(check)
        if not check.ok:
            raise SurgeonError(
                f"{stage}: ONNX Runtime differs from PyTorch by {rel:.2e} of the logits' scale on {what} "
                f"(batch {len(x)}; tolerance {tolerance:.0e} of the scale); {on_failure}"
            )
    return results
