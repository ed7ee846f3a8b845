"""``Session``: load any surgeon artifact with one call and classify images with it.

    from surgeon.runtime import Session
    session = Session("runs/wide/model.onnx")            # backend="auto"
    session.predict(["cat.jpg", pil_image, uint8_hwc_array], topk=3)

The artifact's own metadata gives the preprocessing and class names. Backends: ``ort-cpu``,
``ort-cuda``, ``ort-trt`` (ONNX Runtime providers), ``trt`` (TensorRT engines), ``torch`` (the
grown checkpoint in PyTorch eager). ``auto`` picks by file: checkpoint → torch, engine → trt,
ONNX → ort-cuda where onnxruntime-gpu and a GPU are present, else ort-cpu. A backend that cannot
run here fails with a one-line message saying what to install. ``predict`` and ``run`` may be
called from several threads at once.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from surgeon.errors import SurgeonError
from surgeon.runner import Runner
from surgeon.runtime.artifact import Artifact, read_artifact
from surgeon.spec import BACKENDS

_FOR_KIND = {"onnx": ("ort-cpu", "ort-cuda", "ort-trt"), "engine": ("trt",), "checkpoint": ("torch",)}


@dataclass(frozen=True)
class Prediction:
    label: str
    index: int
    score: float  # softmax probability

    def to_dict(self) -> dict:
        return {"label": self.label, "index": self.index, "score": self.score}


def _auto_backend(kind: str) -> str:
    if kind == "checkpoint":
        return "torch"
    if kind == "engine":
        return "trt"
    from surgeon.runtime.backends import ort

    return "ort-cuda" if ort.available("ort-cuda") is None and _has_cuda() else "ort-cpu"


def _has_cuda() -> bool:
    from surgeon import cuda

    return cuda.available()


class Session:
    def __init__(self, path: str | os.PathLike[str], backend: str = "auto", *, trust_code: bool = False,
                 threads: int | None = None):
        if backend not in BACKENDS:
            raise SurgeonError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.artifact: Artifact = read_artifact(path)
        kind = self.artifact.kind
        self.backend = _auto_backend(kind) if backend == "auto" else backend
        if self.backend not in _FOR_KIND[kind]:
            raise SurgeonError(f"backend {self.backend} cannot run a {kind} file ({self.artifact.path.name}); "
                               f"use one of {', '.join(_FOR_KIND[kind])}")
        self._runner = self._open(threads, trust_code)
        self._transform = None
        self.batch_shape = _batch_shape(self.artifact)

    def _open(self, threads: int | None, trust_code: bool) -> Runner:
        art = self.artifact
        if self.backend == "torch":
            from surgeon.runtime.backends.torch_eager import TorchRunner

            return TorchRunner(art.path, trust_code=trust_code)
        if self.backend == "trt":
            from surgeon.runtime.backends.tensorrt_engine import EngineRunner

            return EngineRunner(art.path, art.input_name, art.output_name, rtx=art.meta.get("surgeon.ahead_of_time") == "True")
        from surgeon.runtime.backends.ort import OrtRunner

        return OrtRunner(art.path, self.backend, art.input_name, threads, checked=True)  # read_artifact checked it

    @property
    def classes(self) -> list[str]:
        return self.artifact.classes

    # -- tensors ------------------------------------------------------------------------------------

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Logits (float32 ``[N, classes]``) for a preprocessed float batch of the model's input shape
        (``[N, 3, S, S]`` for an image model)."""
        batch = np.asarray(batch)
        if not _fits(batch.shape, self.batch_shape):
            raise SurgeonError(f"expected a batch of shape {_show(self.batch_shape)} for input {self.artifact.input_name} "
                               f"of {self.artifact.path.name}, got {list(batch.shape)}")
        if not np.issubdtype(batch.dtype, np.floating):
            raise SurgeonError(f"expected a float batch (preprocessed images), got {batch.dtype}")
        return self._runner.run(batch.astype(np.float32, copy=False))

    def preprocess(self, images: Any | Sequence[Any]) -> np.ndarray:
        """A float32 batch from image paths, PIL images, uint8 ``HxWx3``/``HxW`` arrays, or already
        preprocessed float ``3xSxS`` arrays (used as they are)."""
        items = images if isinstance(images, (list, tuple)) else [images]
        return np.stack([self._one(item) for item in items]) if items else np.zeros((0, *self.artifact.input_shape), np.float32)

    def _one(self, item: Any) -> np.ndarray:
        from PIL import Image

        from surgeon.imageio import open_image, to_rgb
        from surgeon.preprocessing import EvalTransform

        if isinstance(item, np.ndarray) and item.dtype.kind == "f":
            if tuple(item.shape) != self.artifact.input_shape:
                raise SurgeonError(f"a float array must be a preprocessed image of shape {list(self.artifact.input_shape)}, "
                                   f"got {list(item.shape)}")
            return item.astype(np.float32, copy=False)
        if isinstance(item, (str, os.PathLike)):
            image = open_image(item)
        elif isinstance(item, Image.Image):
            image = to_rgb(item)  # 16-bit and float images scaled, not clipped
        elif isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim in (2, 3):
            image = to_rgb(Image.fromarray(item))
        else:
            raise SurgeonError(f"cannot make an image of {type(item).__name__}: pass a path, a PIL image, a uint8 array "
                               f"or a preprocessed float array")
        if self._transform is None:
            self._transform = EvalTransform(self.artifact.preprocessing)  # what validation in training applies
        return self._transform(image)

    # -- predictions --------------------------------------------------------------------------------

    def predict(self, images: Any | Sequence[Any], topk: int = 5) -> list[list[Prediction]]:
        """Top-``topk`` classes with softmax scores for each image, in batches the model accepts."""
        if topk < 1:
            raise SurgeonError(f"--topk must be at least 1, got {topk}")
        images_batch = (None, *self.artifact.input_shape)
        if not _fits(images_batch, self.batch_shape):  # before reading any image: none could be fed
            raise SurgeonError(f"{self.artifact.path.name} cannot classify images: its input {self.artifact.input_name} "
                               f"takes {_show(self.batch_shape)}, but its preprocessing metadata makes batches of "
                               f"{_show(images_batch)}; re-export it with `surgeon export`, or call run() with such batches")
        batch = self.preprocess(images)
        logits = [self.run(batch[i:i + self.artifact.max_batch]) for i in range(0, len(batch), self.artifact.max_batch)]
        return [self._top(row, topk) for chunk in logits for row in chunk]

    def _top(self, logits: np.ndarray, topk: int) -> list[Prediction]:
        z = logits.astype(np.float64) - logits.max()
        probs = np.exp(z) / np.exp(z).sum()
        order = np.argsort(-probs, kind="stable")[:topk]
        names = self.classes
        return [Prediction(names[i] if i < len(names) else str(i), int(i), float(probs[i])) for i in order]

    def __repr__(self) -> str:
        return f"Session({str(self.artifact.path)!r}, backend={self.backend!r})"


def _batch_shape(art: Artifact) -> tuple[int | None, ...]:
    """The batch shape ``run`` accepts (None: any size): the model's declared input, its dynamic
    dims filled in from the preprocessing where it is an image input, else ``[N, 3, S, S]``."""
    image = (None, *art.input_shape)
    dims = art.input_dims
    if dims is None:
        return image
    if len(dims) == 4:
        return tuple(d if d is not None else image[i] for i, d in enumerate(dims))
    return dims


def _fits(shape: Sequence[int | None], want: tuple[int | None, ...]) -> bool:
    return len(shape) == len(want) and all(w is None or s is None or s == w for s, w in zip(shape, want))


def _show(shape: tuple[int | None, ...]) -> str:
    from surgeon.export.onnx_io import show_shape

    return show_shape(shape)


def image_files(paths: Sequence[str]) -> list[Path]:
    """Files, folders (recursively, image files only) and glob patterns, in the order given."""
    import glob

    from surgeon.imageio import IMAGE_EXTENSIONS

    out: list[Path] = []
    for spec in paths:
        matches = sorted(glob.glob(spec, recursive=True)) if any(c in spec for c in "*?[") else [spec]
        if not matches:
            raise SurgeonError(f"{spec} matches no file")
        for m in matches:
            p = Path(m)
            if p.is_dir():
                out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
                              and not any(part.startswith(".") for part in f.relative_to(p).parts))
            elif p.exists():
                out.append(p)
            else:
                raise SurgeonError(f"{p} does not exist")
    return out
