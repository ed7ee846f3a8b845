"""Training data: built-in offline sets, ImageFolder directories and torchvision data sets.

Every data set yields ``(float tensor [3, S, S], int label)`` with the checkpoint's preprocessing, so
whatever a model is trained on, export and runtime see the same inputs. Datasets hold only plain data
and module-level transforms, so they pickle into DataLoader worker processes.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.utils.data
import torchvision.datasets
from PIL import Image
from torchvision import transforms as T
from torchvision.datasets.folder import has_file_allowed_extension, make_dataset

from surgeon import imageio
from surgeon.errors import DataError
from surgeon.imageio import DEFAULT_MAX_IMAGE_PIXELS, to_rgb
from surgeon.imageio import IMAGE_EXTENSIONS as IMG_EXTENSIONS
from surgeon.log import LOG
from surgeon.preprocessing import EvalTransform, Preprocessing

Transform = Callable[[Any], torch.Tensor]

BUILTIN_PREFIX = "builtin:"
TORCHVISION_PREFIX = "torchvision:"
DEFAULT_DATASET_ROOT = "~/.cache/surgeon/datasets"

# The built-in splits use their own fixed seed, not ``load_data(seed=...)``: every run, whatever its
# training seed, must be scored on the same validation images so results stay comparable.
_BUILTIN_SPLIT_SEED = 1234

# Fraction of each built-in set held out for validation. digits-target is the transfer task, and the
# paper's setting is a small labelled target set (few images per class), which is where growing a
# pretrained network pays off; so it trains on 20 % and validates on the remaining 80 %.
_BUILTIN_VAL_FRACTION = {"digits-source": 0.2, "digits-target": 0.8}
_BUILTIN_DIGITS = {"digits-source": range(0, 5), "digits-target": range(5, 10)}

# How many paths or folder entries a message spells out before it says "...".
_SHOW_NAMES = 3

Samples = list[tuple[str, int]]


@dataclass
class DataSplits:
    """A train/val pair of datasets over the same classes."""

    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset
    classes: list[str]
    name: str
    skipped: list[str] = field(default_factory=list)  # unreadable images --skip-bad-images dropped

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# --------------------------------------------------------------------------------------------------
# Transforms


class _AsTensor:
    """A numpy transform's output as a torch tensor (a class, so data sets holding it pickle)."""

    def __init__(self, transform: Callable[[Any], np.ndarray]) -> None:
        self.transform = transform

    def __call__(self, img: Any) -> torch.Tensor:
        return torch.from_numpy(self.transform(img))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform!r})"


def eval_transform(pre: Preprocessing) -> Transform:
    """Deterministic preprocessing (resize, center crop, normalize): :class:`surgeon.preprocessing.EvalTransform`,
    the one export and the deploy side apply, as a tensor. Bit-identical to torchvision's
    ``Compose([Resize, CenterCrop, ToTensor, Normalize])``, which this used to be."""
    return _AsTensor(EvalTransform(pre))


def train_transform(pre: Preprocessing, *, flip: bool = True) -> Transform:
    """Natural-image augmentation in the style of torchvision's classification references.

    The crop scale starts at 0.35 rather than the ImageNet recipe's 0.08: fine-tuning sets are small
    and their objects often fill the frame, so very small crops mostly show background.
    """
    steps: list[Any] = [T.RandomResizedCrop(pre.input_size, scale=(0.35, 1.0))]
    if flip:
        steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), T.Normalize(pre.mean, pre.std)]
    return T.Compose(steps)


def digit_train_transform(pre: Preprocessing) -> Transform:
    """Augmentation that keeps a digit's identity: no flips (a mirrored 2 is not a 2), small affine
    jitter only. Geometry starts from the eval path (resize + center crop) so that train and val see
    digits at the same scale whatever ``pre.resize`` is."""
    return T.Compose(
        [
            T.Resize(pre.resize),
            T.CenterCrop(pre.input_size),
            T.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1)),
            T.ToTensor(),
            T.Normalize(pre.mean, pre.std),
        ]
    )


class _ToRGBThen:
    """Make any PIL image 8-bit RGB before ``transform`` (torchvision sets such as MNIST are grey).
    A class rather than a closure so that datasets holding it still pickle."""

    def __init__(self, transform: Transform) -> None:
        self.transform = transform

    def __call__(self, img: Any) -> torch.Tensor:
        if isinstance(img, Image.Image):
            img = to_rgb(img)
        return self.transform(img)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform!r})"


# --------------------------------------------------------------------------------------------------
# Images and datasets


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def open_image(path: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """:func:`surgeon.imageio.open_image` (8-bit RGB, at most ``max_pixels``, 0 = no cap), its errors
    ending with what to do about a bad training image."""
    try:
        return imageio.open_image(path, max_pixels=max_pixels)
    except DataError as exc:
        remedy = "or pass --skip-bad-images" if isinstance(exc, imageio.ImageTooLargeError) else \
            "fix or remove it, or pass --skip-bad-images"
        raise type(exc)(f"{exc}; {remedy}") from exc.__cause__


class ImageFiles(torch.utils.data.Dataset):
    """Image files with integer labels, decoded by :func:`open_image`."""

    def __init__(self, samples: Sequence[tuple[str, int]], classes: Sequence[str], transform: Transform,
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
        self.samples = list(samples)
        self.targets = [label for _, label in self.samples]
        self.classes = list(classes)
        self.transform = transform
        self.max_image_pixels = max_image_pixels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return self.transform(open_image(path, self.max_image_pixels)), label


class ArrayImages(torch.utils.data.Dataset):
    """Small grey images kept as one uint8 array; a PIL image is built per item (cheap, picklable)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray,
                 classes: Sequence[str], transform: Transform):
        self.images = np.ascontiguousarray(images, dtype=np.uint8)
        self.targets = [int(v) for v in labels]
        self.indices = np.asarray(indices)  # positions in the source set: lets tests check the split
        self.classes = list(classes)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img = Image.fromarray(self.images[index]).convert("RGB")  # grey replicated to 3 channels
        return self.transform(img), self.targets[index]


# --------------------------------------------------------------------------------------------------
# Splitting


def _stratified_split(labels: Sequence[int], val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-class deterministic split. Each class has its own RNG stream, so adding images to one
    class does not reshuffle the others. Classes with >= 2 images keep at least one on each side."""
    labels = np.asarray(labels)
    train_parts, val_parts = [], []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        idx = idx[np.random.default_rng([seed, int(cls)]).permutation(len(idx))]
        n_val = int(round(len(idx) * val_fraction))
        n_val = min(max(n_val, 1), len(idx) - 1) if len(idx) >= 2 else 0
        val_parts.append(idx[:n_val])
        train_parts.append(idx[n_val:])
    return np.sort(np.concatenate(train_parts)), np.sort(np.concatenate(val_parts))


# --------------------------------------------------------------------------------------------------
# Built-in offline sets


def builtin_names() -> list[str]:
    """Specs of the built-in data sets, ready to pass to :func:`load_data`."""
    return [BUILTIN_PREFIX + name for name in _BUILTIN_DIGITS]


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits (ships with the package, no network) as uint8 images and labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    images.flags.writeable = False  # cached and shared between calls
    return images, d.target.astype(np.int64)


def _load_builtin(name: str, pre: Preprocessing, augment: bool) -> DataSplits:
    if name not in _BUILTIN_DIGITS:
        raise DataError(f"unknown built-in data set {BUILTIN_PREFIX}{name}; choose one of {', '.join(builtin_names())}")
    images, digits = _digits()
    wanted = list(_BUILTIN_DIGITS[name])
    keep = np.flatnonzero(np.isin(digits, wanted))
    labels = digits[keep] - wanted[0]  # remap to 0..4
    classes = [str(d) for d in wanted]
    train_idx, val_idx = _stratified_split(labels, _BUILTIN_VAL_FRACTION[name], _BUILTIN_SPLIT_SEED)

    def subset(idx: np.ndarray, transform: Transform) -> ArrayImages:
        return ArrayImages(images[keep[idx]], labels[idx], keep[idx], classes, transform)

    train_tf = digit_train_transform(pre) if augment else eval_transform(pre)
    return DataSplits(
        train=subset(train_idx, train_tf),
        val=subset(val_idx, eval_transform(pre)),
        classes=classes,
        name=BUILTIN_PREFIX + name,
    )


# --------------------------------------------------------------------------------------------------
# ImageFolder directories


def _is_hidden(path: str, root: Path) -> bool:
    # Hidden entries are tool debris (.ipynb_checkpoints, macOS "._x.jpg" resource forks that carry
    # an image extension but are not images), never classes or samples.
    return any(part.startswith(".") for part in Path(path).relative_to(root).parts)


def _find_classes(directory: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))


def _layout_hint(root: Path) -> str:
    return (f"expected {root}/train/<class>/*.jpg with {root}/val/<class>/*.jpg, "
            f"or {root}/<class>/*.jpg (split by --val-split)")


def _some(names: Sequence[str]) -> str:
    return ", ".join(names[:_SHOW_NAMES]) + (", ..." if len(names) > _SHOW_NAMES else "")


def _no_classes(directory: Path, root: Path) -> DataError:
    """The error for a folder without class folders, saying what it holds instead."""
    entries = sorted(e.name for e in os.scandir(directory) if not e.name.startswith("."))
    images = [n for n in entries if has_file_allowed_extension(n, IMG_EXTENSIONS)]
    if not entries:
        found = "it is empty"
    elif images:
        found = f"it holds {len(images)} image(s) ({_some(images)}), which belong in one folder per class"
    else:
        found = f"it holds {len(entries)} file(s) ({_some(entries)}) and no folders"
    return DataError(f"no class folders in {directory}: {found}; {_layout_hint(root)}")


def _no_images(directory: Path, classes: list[str], root: Path) -> DataError:
    """The error for class folders without images, naming the files they do hold (a .heic, a .txt)."""
    others = sorted(str(p.relative_to(directory)) for c in classes for p in (directory / c).rglob("*")
                    if p.is_file() and not _is_hidden(str(p), directory))
    found = f"{len(others)} other file(s): {_some(others)}" if others else "no files"
    return DataError(f"no images in the class folders of {directory} ({_some(classes)}; {found}; image "
                     f"extensions are {', '.join(IMG_EXTENSIONS)}); {_layout_hint(root)}")


def _scan_folder(directory: Path, classes: list[str]) -> Samples:
    class_to_idx = {c: i for i, c in enumerate(classes)}
    return make_dataset(
        str(directory),
        class_to_idx,
        is_valid_file=lambda p: has_file_allowed_extension(p, IMG_EXTENSIONS) and not _is_hidden(p, directory),
        allow_empty=True,
    )


def _is_readable(path: str, max_pixels: int) -> bool:
    try:
        open_image(path, max_pixels)
    except DataError:
        return False
    return True


def _drop_unreadable(samples: Samples, where: Path, max_pixels: int) -> tuple[Samples, list[str]]:
    """Decode every image once; the readable samples and the paths of the others."""
    if not samples:
        return samples, []
    # Decoding is mostly C code that releases the GIL, so threads give real parallelism here.
    with ThreadPoolExecutor(max_workers=min(32, (os.cpu_count() or 1) + 4)) as pool:
        ok = list(pool.map(functools.partial(_is_readable, max_pixels=max_pixels), (p for p, _ in samples)))
    bad = [p for (p, _), good in zip(samples, ok) if not good]
    kept = [s for s, good in zip(samples, ok) if good]
    if not kept:
        raise DataError(f"no readable images left under {where} after skipping {len(bad)} bad one(s) "
                        f"({_some(bad)}); open one with PIL to see why")
    return kept, bad


def _report_skipped(bad: list[str], where: Path) -> None:
    # One plain line on stderr (a warnings.warn would print surgeon's source line too), from one
    # process only under torchrun, where every rank loads the data.
    if bad and int(os.environ.get("RANK", "0")) == 0:
        LOG.warning(f"skipped {len(bad)} unreadable or oversized image(s) under {where}: {_some(bad)}")


def _folder_samples(directory: Path, classes: list[str], root: Path) -> Samples:
    samples = _scan_folder(directory, classes)
    if not samples:
        raise _no_images(directory, classes, root)
    return samples


def _load_folder(spec: str, pre: Preprocessing, *, val_split: float, augment: bool,
                 skip_bad_images: bool, seed: int, max_image_pixels: int) -> DataSplits:
    directory = Path(spec).expanduser()
    if not directory.exists():
        raise DataError(f"data folder {spec} does not exist; pass an image folder, {_accepted_forms()}")
    if not directory.is_dir():
        raise DataError(f"data path {spec} is not a folder; {_layout_hint(directory)}")
    train_tf = train_transform(pre) if augment else eval_transform(pre)
    val_tf = eval_transform(pre)

    skipped: list[str] = []
    train_dir, val_dir = directory / "train", directory / "val"
    if train_dir.is_dir() and val_dir.is_dir():
        classes = _find_classes(train_dir)
        val_classes = _find_classes(val_dir)
        if classes != val_classes:
            only_train = sorted(set(classes) - set(val_classes))
            only_val = sorted(set(val_classes) - set(classes))
            raise DataError(
                f"class folders of {train_dir} and {val_dir} differ (only in train: {only_train}; "
                f"only in val: {only_val}); give both the same class folders"
            )
        if not classes:
            raise _no_classes(train_dir, directory)
        train = _folder_samples(train_dir, classes, directory)
        val = _folder_samples(val_dir, classes, directory)
        if skip_bad_images:
            train, bad_train = _drop_unreadable(train, train_dir, max_image_pixels)
            val, bad_val = _drop_unreadable(val, val_dir, max_image_pixels)
            skipped = bad_train + bad_val
    elif train_dir.is_dir():
        # Treating "train" as a class would silently produce a one-class problem.
        raise DataError(f"{directory} has a train/ folder but no val/ folder; add {val_dir}/<class>/... "
                        f"or put the class folders directly in {directory}")
    else:
        classes = _find_classes(directory)
        if not classes:
            raise _no_classes(directory, directory)
        samples = _folder_samples(directory, classes, directory)
        if skip_bad_images:
            samples, skipped = _drop_unreadable(samples, directory, max_image_pixels)
        train_idx, val_idx = _stratified_split([label for _, label in samples], val_split, seed)
        if len(val_idx) == 0:
            raise DataError(f"too few images in {directory} to hold out a validation set (need 2 or more in "
                            f"some class); add images or use {directory}/train and {directory}/val")
        train = [samples[i] for i in train_idx]
        val = [samples[i] for i in val_idx]

    _report_skipped(skipped, directory)
    return DataSplits(
        train=ImageFiles(train, classes, train_tf, max_image_pixels),
        val=ImageFiles(val, classes, val_tf, max_image_pixels),
        classes=classes,
        name=str(directory),
        skipped=skipped,
    )


# --------------------------------------------------------------------------------------------------
# torchvision data sets

# Split names torchvision data sets use, in order of preference.
_TRAIN_SPLITS = ("train", "trainval", "train-standard")
_VAL_SPLITS = ("test", "val", "valid")
# Label attributes torchvision data sets keep (needed to split sets that ship without a split).
_LABEL_ATTRS = ("targets", "labels", "_labels", "y", "_samples_labels")
_NOT_DATASETS = {"VisionDataset", "DatasetFolder", "ImageFolder"}


def _torchvision_class(name: str) -> type:
    cls = getattr(torchvision.datasets, name, None)
    if name in _NOT_DATASETS:
        raise DataError(f"{TORCHVISION_PREFIX}{name} is not a downloadable data set; pass the folder path itself instead")
    if not (inspect.isclass(cls) and issubclass(cls, torch.utils.data.Dataset)):
        raise DataError(
            f"{name} is not a torchvision data set (see torchvision.datasets, e.g. {TORCHVISION_PREFIX}CIFAR10, "
            f"{TORCHVISION_PREFIX}Flowers102); {_accepted_forms()}"
        )
    return cls


class _UnknownSplit(Exception):
    pass


def _build_torchvision(cls: type, name: str, root: str, transform: Transform, **kwargs: Any) -> Any:
    params = inspect.signature(cls).parameters
    if "download" in params:
        kwargs["download"] = True
    try:
        return cls(root=root, transform=_ToRGBThen(transform), **kwargs)
    except ValueError as exc:
        if "split" in kwargs and "split" in str(exc):  # torchvision's "Unknown value 'x' for argument split"
            raise _UnknownSplit(str(exc)) from exc
        raise _download_error(name, root, exc) from exc
    except Exception as exc:  # network, checksum, archive and file errors all end the same way for a user
        raise _download_error(name, root, exc) from exc


def _download_error(name: str, root: str, exc: BaseException) -> DataError:
    return DataError(
        f"could not load torchvision data set {name} into {root}: {_one_line(exc)}; without network "
        f"access use an image folder or one of {', '.join(builtin_names())}"
    )


def _build_split(cls: type, name: str, root: str, transform: Transform, candidates: Sequence[str]) -> Any:
    tried = []
    for split in candidates:
        try:
            return _build_torchvision(cls, name, root, transform, split=split)
        except _UnknownSplit:
            tried.append(split)
    raise DataError(f"torchvision data set {name} has none of the splits {tried}; download it and pass it as an image folder")


def _labels_of(ds: Any) -> list[int] | None:
    for attr in _LABEL_ATTRS:
        values = getattr(ds, attr, None)
        if values is not None and len(values) == len(ds):
            return [int(v) for v in values]
    return None


def _classes_of(name: str, *datasets: Any) -> list[str]:
    classes = getattr(datasets[0], "classes", None)
    if classes:
        return [str(c) for c in classes]
    labels = [_labels_of(ds) for ds in datasets]
    if any(lab is None for lab in labels):
        raise DataError(f"cannot tell the classes of torchvision data set {name}; export it as an image folder instead")
    return [str(i) for i in range(max(max(lab, default=-1) for lab in labels) + 1)]


def _load_torchvision(name: str, pre: Preprocessing, *, val_split: float, augment: bool,
                      seed: int, root: str | None) -> DataSplits:
    cls = _torchvision_class(name)
    root = os.path.expanduser(root or DEFAULT_DATASET_ROOT)
    params = inspect.signature(cls).parameters
    train_tf = train_transform(pre) if augment else eval_transform(pre)
    val_tf = eval_transform(pre)

    if "train" in params:
        train = _build_torchvision(cls, name, root, train_tf, train=True)
        val = _build_torchvision(cls, name, root, val_tf, train=False)
    elif "split" in params:
        train = _build_split(cls, name, root, train_tf, _TRAIN_SPLITS)
        val = _build_split(cls, name, root, val_tf, _VAL_SPLITS)
    else:
        # Sets that ship as one pool (SUN397, Caltech101/256): split it like a single image folder.
        # Two instances, one per transform; the second reads what the first downloaded.
        full_train = _build_torchvision(cls, name, root, train_tf)
        full_val = _build_torchvision(cls, name, root, val_tf)
        labels = _labels_of(full_train)
        if labels is None:  # no labels to stratify by: a plain seeded permutation
            labels = [0] * len(full_train)
        train_idx, val_idx = _stratified_split(labels, val_split, seed)
        classes = _classes_of(name, full_train)
        return DataSplits(
            train=torch.utils.data.Subset(full_train, train_idx.tolist()),
            val=torch.utils.data.Subset(full_val, val_idx.tolist()),
            classes=classes,
            name=TORCHVISION_PREFIX + name,
        )
    return DataSplits(train=train, val=val, classes=_classes_of(name, train, val), name=TORCHVISION_PREFIX + name)


# --------------------------------------------------------------------------------------------------
# Entry point


def _accepted_forms() -> str:
    return (f"accepted data specs: an image folder (DIR/<class>/<image>.jpg), {TORCHVISION_PREFIX}NAME "
            f"(a torchvision.datasets class), or a built-in set: {', '.join(builtin_names())}")


def _looks_like_scheme(spec: str) -> bool:
    # "foo:bar" is a mistyped spec; "C:\\data" is a Windows path.
    head, sep, _ = spec.partition(":")
    return bool(sep) and len(head) > 1 and "/" not in head and "\\" not in head


def load_data(spec: str, pre: Preprocessing, *, val_split: float = 0.2, augment: bool = True,
              skip_bad_images: bool = False, seed: int = 0, root: str | None = None,
              max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> DataSplits:
    """Resolve a data spec to train/val datasets of ``(tensor [3, S, S], label)``.

    ``spec`` is ``builtin:NAME``, ``torchvision:NAME`` or an ImageFolder directory (either
    ``DIR/train`` + ``DIR/val``, or one folder of class subfolders split by ``val_split`` and
    ``seed``). ``root`` is where torchvision data sets are downloaded. Folder images over
    ``max_image_pixels`` (0 = no cap) are refused before decoding, like unreadable ones.
    """
    if max_image_pixels < 0:
        raise DataError(f"--max-image-pixels must be 0 (no limit) or positive, got {max_image_pixels}")
    if not 0.0 < val_split < 1.0:
        raise DataError(f"val_split must be between 0 and 1 (exclusive), got {val_split}")
    if spec.startswith(BUILTIN_PREFIX):
        return _load_builtin(spec[len(BUILTIN_PREFIX):], pre, augment)
    if spec.startswith(TORCHVISION_PREFIX):
        return _load_torchvision(spec[len(TORCHVISION_PREFIX):], pre, val_split=val_split, augment=augment,
                                 seed=seed, root=root)
    if _looks_like_scheme(spec) and not Path(spec).exists():
        raise DataError(f"unrecognised data spec {spec!r}; {_accepted_forms()}")
    return _load_folder(spec, pre, val_split=val_split, augment=augment, skip_bad_images=skip_bad_images, seed=seed,
                        max_image_pixels=max_image_pixels)
