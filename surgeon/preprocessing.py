"""How images become model inputs: the part of a checkpoint every later stage (export, runtime) reads,
and the evaluation transform that applies it (numpy and PIL, imported lazily; no torch)."""

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

    def at_size(self, input_size: int) -> "Preprocessing":
        """The same preprocessing for inputs of ``input_size``: the resize keeps the usual 0.875 crop
        ratio (or stays equal to the input size where it was)."""
        resize = input_size if self.resize == self.input_size else max(input_size, round(input_size / 0.875))
        return Preprocessing(input_size=input_size, resize=resize, mean=self.mean, std=self.std)

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


# --------------------------------------------------------------------------------------------------
# The evaluation transform, numpy and PIL only: training-side validation (surgeon.train.data wraps it
# in a tensor), export's --calib images and the deploy side (Session, serve) all run this one.
# It reproduces torchvision's Resize(resize) -> CenterCrop(input_size) -> ToTensor() -> Normalize
# step by step (PIL's bilinear resize with its antialiasing, the same rounding of sizes and crop
# offsets, zero padding of a crop larger than the image, float32 arithmetic), so the tensors are
# bit-identical (tests/test_preprocessing.py checks it against torchvision on photos and random sizes).


def resize_short_side(image, size: int):
    """``image`` (PIL) with its short side scaled to ``size`` (bilinear), the long side to
    ``int(size * long / short)``, as ``torchvision.transforms.Resize(size)``."""
    from PIL import Image

    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) == (w, h):
        return image
    return image.resize((new_w, new_h), Image.BILINEAR)


def center_crop(image, size: int):
    """The central ``size`` x ``size`` of ``image`` (PIL), zero-padded where the image is smaller, as
    ``torchvision.transforms.CenterCrop(size)``."""
    from PIL import Image

    w, h = image.size
    if size > w or size > h:
        left, top = (size - w) // 2 if size > w else 0, (size - h) // 2 if size > h else 0
        canvas = Image.new(image.mode, (max(w, size), max(h, size)), 0)
        canvas.paste(image, (left, top))
        image = canvas
        w, h = image.size
        if (w, h) == (size, size):
            return image
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


class EvalTransform:
    """8-bit RGB PIL image → float32 ``[3, input_size, input_size]`` numpy array, normalized.

    A class (not a closure) so data sets holding it pickle for DataLoader workers; safe to call from
    several threads."""

    def __init__(self, pre: Preprocessing) -> None:
        import numpy as np

        self.pre = pre
        self._mean = np.asarray(pre.mean, np.float32).reshape(3, 1, 1)
        self._std = np.asarray(pre.std, np.float32).reshape(3, 1, 1)

    def __call__(self, image):
        import numpy as np

        image = center_crop(resize_short_side(image, self.pre.resize), self.pre.input_size)
        x = np.asarray(image, dtype=np.uint8)
        if x.ndim != 3 or x.shape[2] != 3:
            raise PreprocessingError(f"the eval transform takes 8-bit RGB images, got mode {image.mode}")
        x = x.transpose(2, 0, 1).astype(np.float32) / np.float32(255)
        return (x - self._mean) / self._std

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.pre})"
