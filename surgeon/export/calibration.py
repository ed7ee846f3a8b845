"""Calibration images for INT8 quantization: which files, how they are split, how they become inputs.

A ``--calib`` folder is split deterministically into a calibration part (ranges are measured on it)
and a held-out part (agreement with the fp32 model is measured on it, so the report is not graded on
the images the ranges were fitted to). ``--data`` is a labelled folder (one subfolder per class, as
for training) on which accuracy is compared. Images go through the model's own preprocessing (the
ONNX metadata), the same transform as ``predict`` and training-side validation.

numpy and PIL only: ``surgeon quantize`` runs in the deploy install (no PyTorch).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from surgeon.errors import DataError, SurgeonError
from surgeon.preprocessing import Preprocessing

SPLIT_SEED = 0  # the split is a property of the folder, not of the run
HELD_OUT_MAX = 1024  # agreement on more held-out images costs time and changes little


@dataclass(frozen=True)
class CalibrationSplit:
    calibration: list[Path]
    held_out: list[Path]


def _images_under(root: Path) -> list[Path]:
    from surgeon.imageio import IMAGE_EXTENSIONS

    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def image_files(folder: str | Path, what: str = "--calib") -> list[Path]:
    """Every image file under ``folder`` (recursively, hidden ones skipped), sorted; one-line errors
    for a missing or empty folder."""
    from surgeon.imageio import IMAGE_EXTENSIONS

    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"{what} folder {root} does not exist" if not root.exists() else f"{what} {root} is not a folder")
    files = _images_under(root)
    if not files:
        raise DataError(f"{what} folder {root} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def split(files: list[Path], samples: int, what: str = "--calib") -> CalibrationSplit:
    """At most ``samples`` images, and at most half the folder, calibrate; the rest (up to
    HELD_OUT_MAX) is held out. A fixed permutation of the sorted names, so the same folder always
    splits the same way and neither part is one class of a folder sorted by class."""
    if samples < 1:
        raise SurgeonError(f"--calib-samples must be at least 1, got {samples}")
    if len(files) < 2:
        raise DataError(f"{what} needs at least 2 images (one to calibrate, one held out to measure agreement), "
                        f"found {len(files)}")
    order = [files[i] for i in np.random.default_rng(SPLIT_SEED).permutation(len(files))]
    n = min(samples, len(files) // 2)
    return CalibrationSplit(order[:n], order[n:n + HELD_OUT_MAX])


def model_preprocessing(proto: onnx.ModelProto, inputs: list[onnx.ValueInfoProto], path: str | Path) -> Preprocessing:
    """The preprocessing the model was exported with (its metadata), or ImageNet's at its static
    input size for a foreign file; refused when the model's declared input cannot take the images
    that preprocessing makes (a static-shape model of another size). ``inputs``: the image inputs
    (a LeanModel declares its weights as inputs too)."""
    from surgeon.export.onnx_io import declared_dims, show_shape

    meta = {p.key: p.value for p in proto.metadata_props}
    if len(inputs) != 1:
        raise SurgeonError(f"{path}: expected one image input, found {len(inputs)}")
    dims = declared_dims(inputs[0])
    if "surgeon.preprocessing" in meta:
        pre = Preprocessing.from_dict(json.loads(meta["surgeon.preprocessing"]))
    elif dims and len(dims) == 4 and dims[3]:
        pre = Preprocessing(input_size=dims[3], resize=round(dims[3] * 256 / 224))
    else:
        raise SurgeonError(f"{path} has no surgeon metadata and no static input size: cannot tell how to preprocess "
                           f"the calibration images")
    want = (None, 3, pre.input_size, pre.input_size)
    if dims is not None and (len(dims) != 4 or any(d is not None and w is not None and d != w for d, w in zip(dims, want))):
        raise SurgeonError(f"{path}: its input {inputs[0].name} takes {show_shape(dims)}, but its preprocessing makes "
                           f"images of {show_shape(want)}: calibration images cannot be fed (re-export the model)")
    return pre


def load_images(files: list[Path], pre: Preprocessing) -> np.ndarray:
    """``[N, 3, S, S]`` float32, preprocessed; the first unreadable file stops it, by name."""
    from surgeon.imageio import open_image
    from surgeon.preprocessing import EvalTransform

    transform = EvalTransform(pre)
    return np.stack([transform(open_image(f)) for f in files]) if files else np.zeros((0, 3, pre.input_size, pre.input_size), np.float32)


def labelled_images(folder: str | Path, classes: list[str]) -> tuple[list[Path], np.ndarray]:
    """A ``--data`` folder (``DIR/<class>/image``) and each image's class index in the model: by
    name where every subfolder is one of the model's classes, else by sorted position (ImageFolder's
    order) where there are as many subfolders as classes."""
    root = Path(folder)
    image_files(root, "--data")  # the missing/empty-folder errors
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subdirs:
        raise DataError(f"--data {root} has no class subfolders (expected DIR/<class>/<image>)")
    names = [d.name for d in subdirs]
    if all(n in classes for n in names):
        index = {n: classes.index(n) for n in names}
    elif len(names) == len(classes):
        index = {n: i for i, n in enumerate(names)}
    else:
        raise DataError(f"--data {root}: its {len(names)} class folders ({', '.join(names[:5])}) are neither the model's "
                        f"classes ({', '.join(classes[:5])}) nor as many as them ({len(classes)})")
    files, labels = [], []
    for d in subdirs:
        found = _images_under(d)
        files += found
        labels += [index[d.name]] * len(found)
    return files, np.asarray(labels, np.int64)
