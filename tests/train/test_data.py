"""Tests for surgeon.train.data: built-in digits, ImageFolder directories, torchvision specs."""

from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets
from PIL import Image
from sklearn.datasets import load_digits

from surgeon.errors import DataError
from surgeon.preprocessing import Preprocessing
from surgeon.log import setup_cli_logging
from surgeon.train.data import builtin_names, eval_transform, load_data, open_image, train_transform

PRE = Preprocessing(input_size=32, resize=36)
SOURCE, TARGET = "builtin:digits-source", "builtin:digits-target"
DIGITS = load_digits()


# ------------------------------------------------------------------------------------------------
# helpers


def _image(seed: int, size=(14, 11), mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).convert(mode)


def _write_class_folders(root: Path, classes=("cat", "dog", "owl"), per_class=5, seed=0) -> list[Path]:
    """Tiny images, alternating PNG and JPEG (one grey PNG per class to exercise RGB conversion)."""
    paths = []
    for ci, cls in enumerate(classes):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            ext = ".png" if i % 2 == 0 else ".jpg"
            mode = "L" if i == 0 else "RGB"
            path = root / cls / f"img{i}{ext}"
            _image(seed * 1000 + ci * 100 + i, mode=mode).save(path)
            paths.append(path)
    return paths


def _truncated_jpeg(path: Path) -> None:
    buf = io.BytesIO()
    _image(7, size=(64, 64)).save(buf, format="JPEG", quality=95)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


def _digit_counts(digits) -> int:
    return int(np.isin(DIGITS.target, list(digits)).sum())


def _paths(ds) -> list[str]:
    return [p for p, _ in ds.samples]


# ------------------------------------------------------------------------------------------------
# built-in digits


def test_builtin_names():
    assert builtin_names() == [SOURCE, TARGET]


@pytest.mark.parametrize("spec, digits, train_fraction", [(SOURCE, range(0, 5), 0.8), (TARGET, range(5, 10), 0.2)])
def test_builtin_sizes_labels_classes(spec, digits, train_fraction):
    splits = load_data(spec, PRE)
    total = len(splits.train) + len(splits.val)
    assert total == _digit_counts(digits)
    assert splits.classes == [str(d) for d in digits]
    assert splits.name == spec and splits.num_classes == 5
    assert abs(len(splits.train) / total - train_fraction) < 0.01
    for ds in (splits.train, splits.val):
        assert set(ds.targets) == set(range(5))  # stratified: every class on both sides
        # the stored label is the digit minus the first digit of the range
        assert np.array_equal(DIGITS.target[ds.indices] - digits[0], ds.targets)


def test_builtin_split_deterministic_disjoint_and_independent_of_seed():
    a = load_data(TARGET, PRE, seed=0)
    b = load_data(TARGET, PRE, seed=123)
    assert np.array_equal(a.train.indices, b.train.indices)
    assert np.array_equal(a.val.indices, b.val.indices)
    assert not set(a.train.indices) & set(a.val.indices)
    assert set(a.train.indices) | set(a.val.indices) == set(np.flatnonzero(DIGITS.target >= 5))


@pytest.mark.parametrize("size", [32, 24])
def test_builtin_tensor_shapes(size):
    splits = load_data(SOURCE, Preprocessing(input_size=size, resize=size + 4))
    for ds in (splits.train, splits.val):
        x, y = ds[3]
        assert x.shape == (3, size, size) and x.dtype == torch.float32
        assert isinstance(y, int) and 0 <= y < 5


def test_builtin_pixels_are_scaled_grey_replicated():
    plain = Preprocessing(input_size=8, resize=8, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    splits = load_data(SOURCE, plain)
    x, _ = splits.val[0]
    expected = torch.from_numpy(DIGITS.images[splits.val.indices[0]] / 16.0).float()
    for c in range(3):
        torch.testing.assert_close(x[c], expected, atol=1 / 255, rtol=0)


def test_val_transform_deterministic_and_train_augments():
    splits = load_data(SOURCE, PRE)
    torch.testing.assert_close(splits.val[5][0], splits.val[5][0], atol=0, rtol=0)
    torch.manual_seed(0)
    assert not torch.equal(splits.train[5][0], splits.train[5][0])
    no_aug = load_data(SOURCE, PRE, augment=False)
    assert torch.equal(no_aug.train[5][0], no_aug.train[5][0])


def test_unknown_builtin_lists_builtins():
    with pytest.raises(DataError, match="digits-source.*digits-target"):
        load_data("builtin:cifar", PRE)


# ------------------------------------------------------------------------------------------------
# transforms


def test_transforms_output_size_and_flip_option():
    img = _image(1, size=(50, 40))
    assert eval_transform(PRE)(img).shape == (3, 32, 32)
    assert train_transform(PRE)(img).shape == (3, 32, 32)
    assert any(type(t).__name__ == "RandomHorizontalFlip" for t in train_transform(PRE).transforms)
    assert not any(type(t).__name__ == "RandomHorizontalFlip" for t in train_transform(PRE, flip=False).transforms)


def test_eval_transform_normalizes():
    img = Image.new("RGB", (40, 40), (255, 0, 128))
    pre = Preprocessing(input_size=32, resize=36, mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 0.5))
    x = eval_transform(pre)(img)
    torch.testing.assert_close(x[:, 0, 0], torch.tensor([1.0, -2.0, (128 / 255 - 0.5) / 0.5]))


# ------------------------------------------------------------------------------------------------
# image folders


def test_single_folder_split(tmp_path):
    _write_class_folders(tmp_path)
    splits = load_data(str(tmp_path), PRE, val_split=0.4, seed=0)
    assert splits.classes == ["cat", "dog", "owl"]
    assert splits.name == str(tmp_path)
    assert len(splits.train) == 9 and len(splits.val) == 6  # 3 + 2 per class
    assert sorted(splits.val.targets) == [0, 0, 1, 1, 2, 2]
    assert not set(_paths(splits.train)) & set(_paths(splits.val))
    for ds in (splits.train, splits.val):
        for i in range(len(ds)):
            x, y = ds[i]
            assert x.shape == (3, 32, 32) and ds.classes[y] in Path(ds.samples[i][0]).parts


def test_single_folder_split_follows_seed(tmp_path):
    _write_class_folders(tmp_path, per_class=8)
    a = load_data(str(tmp_path), PRE, seed=0)
    again = load_data(str(tmp_path), PRE, seed=0)
    other = load_data(str(tmp_path), PRE, seed=1)
    assert _paths(a.val) == _paths(again.val)
    assert _paths(a.val) != _paths(other.val)


def test_hidden_entries_are_ignored(tmp_path):
    _write_class_folders(tmp_path)
    (tmp_path / ".ipynb_checkpoints").mkdir()
    _image(3).save(tmp_path / ".ipynb_checkpoints" / "x.png")
    (tmp_path / "cat" / "._img0.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    splits = load_data(str(tmp_path), PRE, augment=False)
    assert splits.classes == ["cat", "dog", "owl"]
    assert all("._" not in p for p in _paths(splits.train) + _paths(splits.val))


def test_train_val_layout(tmp_path):
    _write_class_folders(tmp_path / "train", per_class=4)
    _write_class_folders(tmp_path / "val", per_class=2, seed=1)
    splits = load_data(str(tmp_path), PRE)
    assert splits.classes == ["cat", "dog", "owl"]
    assert len(splits.train) == 12 and len(splits.val) == 6
    assert all("/train/" in p for p in _paths(splits.train))
    assert all("/val/" in p for p in _paths(splits.val))
    assert splits.val[0][0].shape == (3, 32, 32)


def test_train_val_class_mismatch(tmp_path):
    _write_class_folders(tmp_path / "train", classes=("cat", "dog"))
    _write_class_folders(tmp_path / "val", classes=("cat", "emu"))
    with pytest.raises(DataError) as err:
        load_data(str(tmp_path), PRE)
    assert "dog" in str(err.value) and "emu" in str(err.value)


def test_train_without_val_folder(tmp_path):
    _write_class_folders(tmp_path / "train")
    with pytest.raises(DataError, match="no val/ folder"):
        load_data(str(tmp_path), PRE)


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_data(str(tmp_path / "nope"), PRE)


def _empty_dir(root: Path) -> None:
    pass


def _loose_files(root: Path) -> None:
    (root / "notes.txt").write_text("x")
    (root / "labels.csv").write_text("x")


def _loose_images(root: Path) -> None:
    for i in range(2):
        _image(i).save(root / f"img{i}.png")


def _empty_train(root: Path) -> None:
    (root / "train").mkdir()
    (root / "val").mkdir()


def _imageless_train_classes(root: Path) -> None:
    for split in ("train", "val"):
        (root / split / "cat").mkdir(parents=True)
        (root / split / "dog").mkdir(parents=True)


def _imageless_classes(root: Path) -> None:
    (root / "cat").mkdir()
    (root / "cat" / "photo.heic").write_bytes(b"x")
    (root / "dog").mkdir()


@pytest.mark.parametrize("make, where, found", [
    (_empty_dir, "", "it is empty"),
    (_loose_files, "", "2 file(s) (labels.csv, notes.txt) and no folders"),
    (_loose_images, "", "2 image(s) (img0.png, img1.png)"),
    (_empty_train, "/train", "it is empty"),
    (_imageless_train_classes, "/train", "(cat, dog; no files;"),
    (_imageless_classes, "", "(cat, dog; 1 other file(s): cat/photo.heic;"),
], ids=["empty", "files-no-classes", "images-no-classes", "empty-train", "train-classes-no-images",
        "classes-no-images"])
def test_empty_folder_errors_say_what_was_found_and_both_layouts(tmp_path, make, where, found):
    make(tmp_path)
    with pytest.raises(DataError) as err:
        load_data(str(tmp_path), PRE)
    message = str(err.value)
    assert f"{tmp_path}{where}" in message and found in message, message
    assert f"{tmp_path}/train/<class>/*.jpg with {tmp_path}/val/<class>/*.jpg" in message
    assert f"or {tmp_path}/<class>/*.jpg (split by --val-split)" in message
    assert "train/train" not in message and "\n" not in message


@pytest.mark.parametrize("val_split", [0.0, 1.0, -0.1, 1.5])
def test_bad_val_split(tmp_path, val_split):
    _write_class_folders(tmp_path)
    with pytest.raises(DataError, match="val_split"):
        load_data(str(tmp_path), PRE, val_split=val_split)


def _add_bad_images(root: Path) -> list[Path]:
    garbage = root / "dog" / "garbage.jpg"
    garbage.write_bytes(b"this is not a jpeg at all" * 10)
    truncated = root / "owl" / "truncated.jpg"
    _truncated_jpeg(truncated)
    return [garbage, truncated]


@pytest.mark.parametrize("which", [0, 1], ids=["garbage", "truncated"])
def test_corrupt_image_raises_naming_the_file(tmp_path, which):
    _write_class_folders(tmp_path)
    bad = _add_bad_images(tmp_path)[which]
    splits = load_data(str(tmp_path), PRE, val_split=0.5)  # lazy: listing does not decode
    ds = splits.train if str(bad) in _paths(splits.train) else splits.val
    index = _paths(ds).index(str(bad))
    with pytest.raises(DataError) as err:
        ds[index]
    message = str(err.value)
    assert str(bad) in message and "--skip-bad-images" in message and "\n" not in message
    ds[(index + 1) % len(ds)]  # the good ones still load


def test_open_image_returns_rgb_and_names_bad_file(tmp_path):
    grey = tmp_path / "g.png"
    _image(2, mode="L").save(grey)
    assert open_image(grey).mode == "RGB"
    with pytest.raises(DataError, match="missing.png"):
        open_image(tmp_path / "missing.png")


def test_skip_bad_images_drops_and_reports_in_one_line(tmp_path, capsys):
    setup_cli_logging()  # as the CLI does: the surgeon logger's warnings as plain lines on stderr
    _write_class_folders(tmp_path)
    bad = _add_bad_images(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a Python warning would print surgeon's source line
        splits = load_data(str(tmp_path), PRE, skip_bad_images=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    [line] = captured.err.splitlines()
    assert line.startswith(f"warning: skipped 2 unreadable or oversized image(s) under {tmp_path}: ")
    assert all(str(p) in line for p in bad)
    assert sorted(splits.skipped) == sorted(str(p) for p in bad)
    kept = _paths(splits.train) + _paths(splits.val)
    assert len(kept) == 15 and not {str(p) for p in bad} & set(kept)
    for ds in (splits.train, splits.val):
        for i in range(len(ds)):
            ds[i]


def test_skip_report_lists_the_first_few_paths_once_for_train_and_val(tmp_path, capsys):
    setup_cli_logging()
    for split in ("train", "val"):
        _write_class_folders(tmp_path / split, classes=("cat", "dog"))
        for i in range(3):
            (tmp_path / split / "cat" / f"bad{i}.jpg").write_bytes(b"junk")
    splits = load_data(str(tmp_path), PRE, skip_bad_images=True)
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"warning: skipped 6 unreadable or oversized image(s) under {tmp_path}: ") and line.endswith(", ...")
    assert line.count("bad") == 3 and len(splits.skipped) == 6


def test_skip_report_comes_from_rank_0_only(tmp_path, capsys, monkeypatch):
    _write_class_folders(tmp_path)
    _add_bad_images(tmp_path)
    monkeypatch.setenv("RANK", "1")
    assert len(load_data(str(tmp_path), PRE, skip_bad_images=True).skipped) == 2
    assert capsys.readouterr().err == ""


def test_skip_bad_images_without_bad_ones_is_silent(tmp_path, capsys):
    _write_class_folders(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_data(str(tmp_path), PRE, skip_bad_images=True).skipped == []
    assert capsys.readouterr().err == ""


def test_skip_bad_images_nothing_left(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "a.jpg").write_bytes(b"junk")
    with pytest.raises(DataError, match="no readable images") as err:
        load_data(str(tmp_path), PRE, skip_bad_images=True)
    assert "a.jpg" in str(err.value)


# ------------------------------------------------------------------------------------------------
# image decoding and the pixel cap (rules themselves: tests/test_imageio.py)


def test_16_bit_training_images_are_not_white(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for cls in ("a", "b"):
        for i in range(2):
            Image.fromarray(np.full((20, 20), 16384, dtype=np.uint16)).save(tmp_path / cls / f"{i}.png")
    splits = load_data(str(tmp_path), Preprocessing(input_size=16, resize=16, mean=(0, 0, 0), std=(1, 1, 1)),
                       augment=False)
    x, _ = splits.train[0]
    assert torch.allclose(x, torch.full_like(x, round(16384 / 65535 * 255) / 255))


def test_open_image_keeps_its_training_remedy(tmp_path):
    _image(0, size=(30, 20)).save(tmp_path / "big.png")
    with pytest.raises(DataError) as err:
        open_image(tmp_path / "big.png", max_pixels=100)
    message = str(err.value)
    assert "30x20" in message and "--max-image-pixels" in message and "--skip-bad-images" in message


def test_max_image_pixels_reaches_the_datasets(tmp_path):
    _write_class_folders(tmp_path, per_class=4)  # 14x11 = 154 pixels each
    Image.new("RGB", (40, 40)).save(tmp_path / "cat" / "big.png")
    splits = load_data(str(tmp_path), PRE, val_split=0.5, max_image_pixels=1000)
    ds = splits.train if str(tmp_path / "cat" / "big.png") in _paths(splits.train) else splits.val
    index = _paths(ds).index(str(tmp_path / "cat" / "big.png"))
    with pytest.raises(DataError, match=r"big\.png is 40x40 .*--max-image-pixels"):
        ds[index]
    pickle.loads(pickle.dumps(ds))[(index + 1) % len(ds)]  # the cap travels to DataLoader workers
    skipped = load_data(str(tmp_path), PRE, max_image_pixels=1000, skip_bad_images=True).skipped
    assert skipped == [str(tmp_path / "cat" / "big.png")]
    assert load_data(str(tmp_path), PRE, max_image_pixels=0, skip_bad_images=True).skipped == []
    with pytest.raises(DataError, match="--max-image-pixels"):
        load_data(str(tmp_path), PRE, max_image_pixels=-1)


# ------------------------------------------------------------------------------------------------
# spec parsing and torchvision


@pytest.mark.parametrize("spec", ["foo:bar", "hf:cifar10"])
def test_unknown_spec_lists_forms_and_builtins(spec):
    with pytest.raises(DataError) as err:
        load_data(spec, PRE)
    message = str(err.value)
    assert all(name in message for name in builtin_names())
    assert "torchvision:NAME" in message and "<class>/<image>" in message


def test_unknown_torchvision_name():
    with pytest.raises(DataError, match="NoSuchSet is not a torchvision data set"):
        load_data("torchvision:NoSuchSet", PRE)
    with pytest.raises(DataError, match="folder path"):
        load_data("torchvision:ImageFolder", PRE)


class _FakeBase(torch.utils.data.Dataset):
    """Grey images with labels, recording how torchvision-style constructors were called."""

    calls: list[dict] = []

    def _setup(self, n: int, **kwargs):
        type(self).calls.append(kwargs)
        self.transform = kwargs["transform"]
        self.targets = [i % 3 for i in range(n)]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.transform(_image(i, size=(20, 20), mode="L")), self.targets[i]


class FakeTrainFlag(_FakeBase):
    classes = ["a", "b", "c"]

    def __init__(self, root, train=True, transform=None, target_transform=None, download=False):
        self._setup(12 if train else 6, root=root, train=train, transform=transform, download=download)


class FakeSplit(_FakeBase):
    def __init__(self, root, split="train", transform=None, download=False):
        if split not in ("train", "val"):
            raise ValueError(f"Unknown value '{split}' for argument split. Valid values are {{'train', 'val'}}.")
        self._setup(9 if split == "train" else 3, root=root, split=split, transform=transform, download=download)


class FakeNoSplit(_FakeBase):
    def __init__(self, root, transform=None, download=False):
        self._setup(30, root=root, transform=transform, download=download)


class FakeOffline(_FakeBase):
    def __init__(self, root, train=True, transform=None, download=False):
        raise RuntimeError("Error downloading fake.tar.gz:\n<urlopen error [Errno -3] no network>")


@pytest.fixture
def fake_sets(monkeypatch):
    for cls in (FakeTrainFlag, FakeSplit, FakeNoSplit, FakeOffline):
        monkeypatch.setattr(torchvision.datasets, cls.__name__, cls, raising=False)
    _FakeBase.calls = []
    return _FakeBase.calls


def test_torchvision_train_flag_signature(fake_sets, tmp_path):
    splits = load_data("torchvision:FakeTrainFlag", PRE, root=str(tmp_path))
    assert [c["train"] for c in fake_sets] == [True, False]
    assert all(c["root"] == str(tmp_path) and c["download"] is True for c in fake_sets)
    assert splits.classes == ["a", "b", "c"] and splits.name == "torchvision:FakeTrainFlag"
    assert (len(splits.train), len(splits.val)) == (12, 6)
    x, y = splits.val[0]
    assert x.shape == (3, 32, 32) and y == 0  # grey converted to 3 channels


def test_torchvision_split_signature_falls_back_to_val(fake_sets, tmp_path):
    splits = load_data("torchvision:FakeSplit", PRE, root=str(tmp_path))
    assert [c["split"] for c in fake_sets] == ["train", "val"]  # "test" was refused, "val" used
    assert splits.classes == ["0", "1", "2"]  # no .classes: names from the labels
    assert (len(splits.train), len(splits.val)) == (9, 3)
    assert splits.train[1][0].shape == (3, 32, 32)


def test_torchvision_without_split_is_split_by_labels(fake_sets, tmp_path):
    splits = load_data("torchvision:FakeNoSplit", PRE, root=str(tmp_path), val_split=0.2)
    assert (len(splits.train), len(splits.val)) == (24, 6)
    assert not set(splits.train.indices) & set(splits.val.indices)
    assert splits.val[0][0].shape == (3, 32, 32)


def test_torchvision_default_root_and_download_failure(fake_sets, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    load_data("torchvision:FakeTrainFlag", PRE)
    assert fake_sets[0]["root"] == str(tmp_path / ".cache" / "surgeon" / "datasets")
    with pytest.raises(DataError) as err:
        load_data("torchvision:FakeOffline", PRE)
    message = str(err.value)
    assert "no network" in message and "builtin:digits-target" in message and "\n" not in message


# ------------------------------------------------------------------------------------------------
# worker processes


def _check_loader(ds, size: int) -> None:
    copy = pickle.loads(pickle.dumps(ds))
    assert copy[0][0].shape == (3, size, size)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True, num_workers=2)
    batches = 0
    for x, y in loader:
        assert x.shape == (4, 3, size, size) and y.dtype == torch.int64
        batches += 1
        if batches == 2:
            break
    assert batches == 2


def test_builtin_pickles_and_loads_in_workers():
    splits = load_data(TARGET, PRE)
    _check_loader(splits.train, 32)
    _check_loader(splits.val, 32)


def test_folder_pickles_and_loads_in_workers(tmp_path):
    _write_class_folders(tmp_path, per_class=6)
    splits = load_data(str(tmp_path), PRE, val_split=0.5)
    _check_loader(splits.train, 32)
    _check_loader(splits.val, 32)
