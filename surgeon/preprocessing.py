"""How images become model inputs: the part of a checkpoint every later stage (export, runtime) reads."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from surgeon.errors import SurgeonError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Classification inputs beyond this are a typo or a hostile file: one 4096px fp32 image is 200 MB
# and a model's activations at that size many GB.
MAX_INPUT_SIZE = 4096


class PreprocessingError(SurgeonError, ValueError):
    """Preprocessing values that cannot describe a real model input (a ValueError, so a checkpoint
    reader reports it as a bad field)."""


@dataclass(frozen=True)
class Preprocessing:
    """Evaluation-time preprocessing: resize the short side to ``resize``, center-crop ``input_size``,
    scale to [0, 1], normalize with ``mean``/``std`` (RGB order)."""

    input_size: int = 224
    resize: int = 256
    mean: tuple[float, ...] = field(default=IMAGENET_MEAN)
    std: tuple[float, ...] = field(default=IMAGENET_STD)

    def __post_init__(self) -> None:
        check_input_size(self.input_size, "preprocessing input_size")
        check_input_size(self.resize, "preprocessing resize", limit=2 * MAX_INPUT_SIZE)
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) != 3 or not all(math.isfinite(v) for v in values):
                raise PreprocessingError(f"preprocessing {name} must be 3 finite numbers (RGB), got {list(values)}")
        if min(self.std) <= 0:
            raise PreprocessingError(f"preprocessing std must be positive, got {list(self.std)}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        return cls(
            input_size=int(d["input_size"]),
            resize=int(d["resize"]),
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
        )


def check_input_size(size: int, what: str = "--input-size", *, limit: int = MAX_INPUT_SIZE) -> int:
    """``size`` if it is a usable image side in pixels, else a one-line error naming ``what``."""
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= limit:
        raise PreprocessingError(f"{what} must be a whole number of pixels from 1 to {limit}, got {size!r}")
    return size
