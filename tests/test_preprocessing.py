"""The numpy/PIL eval transform (surgeon.preprocessing.EvalTransform: the deploy side, export's
--calib, training-side validation) gives the tensors torchvision's Resize → CenterCrop → ToTensor →
Normalize gives: bit-identical (tolerance 0), on photos and on random sizes, crops larger than the
image included."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import sklearn
import torch
from PIL import Image
from torchvision import transforms as T

from surgeon.imageio import IMAGE_EXTENSIONS, open_image
from surgeon.preprocessing import IMAGENET_MEAN, IMAGENET_STD, EvalTransform, Preprocessing
from surgeon.train.data import eval_transform

PHOTOS = sorted((Path(sklearn.__file__).parent / "datasets" / "images").glob("*.jpg"))  # china.jpg, flower.jpg


def torchvision_eval(pre: Preprocessing):
    """What surgeon.train.data.eval_transform was before it moved: the reference."""
    return T.Compose([T.Resize(pre.resize), T.CenterCrop(pre.input_size), T.ToTensor(), T.Normalize(pre.mean, pre.std)])


@pytest.mark.parametrize("photo", PHOTOS, ids=lambda p: p.name)
@pytest.mark.parametrize("input_size,resize", [(224, 256), (32, 36), (299, 342), (256, 224), (17, 17)])
def test_photos_match_torchvision_exactly(photo, input_size, resize):
    image = open_image(photo)
    pre = Preprocessing(input_size=input_size, resize=resize)
    want = torchvision_eval(pre)(image).numpy()
    got = EvalTransform(pre)(image)
    assert got.dtype == np.float32 and got.shape == (3, input_size, input_size)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(eval_transform(pre)(image).numpy(), want)  # the training side runs the same


def test_random_sizes_and_statistics_match_torchvision_exactly():
    rng = np.random.default_rng(0)
    for _ in range(60):
        w, h = (int(v) for v in rng.integers(3, 300, 2))
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        size = int(rng.integers(2, 200))
        pre = Preprocessing(input_size=size, resize=int(rng.integers(max(1, size // 2), 2 * size)),
                            mean=tuple(rng.uniform(0, 1, 3)), std=tuple(rng.uniform(0.05, 1, 3)))
        np.testing.assert_array_equal(EvalTransform(pre)(image), torchvision_eval(pre)(image).numpy(), err_msg=f"{w}x{h} {pre}")


def test_training_side_gives_tensors_and_pickles():
    import pickle

    pre = Preprocessing(input_size=8, resize=10, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    transform = pickle.loads(pickle.dumps(eval_transform(pre)))
    x = transform(Image.new("RGB", (12, 9), (10, 200, 30)))
    assert isinstance(x, torch.Tensor) and x.dtype == torch.float32 and x.shape == (3, 8, 8)


def test_image_extensions_are_torchvisions():
    from torchvision.datasets.folder import IMG_EXTENSIONS

    assert IMAGE_EXTENSIONS == IMG_EXTENSIONS
