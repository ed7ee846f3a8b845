"""Decoding image files to 8-bit RGB: the one place training data, ``predict`` and ``serve`` read images.

numpy and PIL only (no torch), so the deploy side can use it without PyTorch.

Rules (PIL's ``convert("RGB")`` clips high-bit-depth modes, so 16-bit and float images came out white
or black):

* 16-bit integer images (``I;16*``, and ``I``, which PIL uses for 16-bit PNG/PGM/TIFF grey) are
  scaled by the full range of the type, ``v * 255 / 65535``, not stretched min-to-max, so an image's
  brightness is kept. An ``I`` image with values outside 0..65535 (real 32-bit data) is refused.
* Float images (``F``) are taken to hold 0..1 when their largest finite value is at most 1, else
  0..255; values outside are clipped, NaN becomes 0.
* 16-bit RGB/RGBA PNGs: PIL itself keeps the high byte (``v // 256``), within one level of the rule
  above.
* Alpha is dropped (the colour channels are kept as stored), as torchvision's loader and
  ``convert("RGB")`` always did here: models trained through this module see the same pixels as before.
* Everything else (``L``, ``1``, ``P`` with or without transparency, ``LA``, ``RGBA``, ``CMYK``,
  ``YCbCr``, ...) goes through PIL's own conversion.

Size: :func:`open_image` reads the size from the header and refuses images over ``max_pixels``
before decoding anything (PIL's open is lazy).
"""

from __future__ import annotations

import os
import threading
import warnings
from typing import IO, Union

import numpy as np
from PIL import Image

from surgeon.errors import DataError
from surgeon.spec import DEFAULT_MAX_IMAGE_PIXELS  # noqa: F401  (re-exported: the cap lives with the CLI's plain values)


# File suffixes read as images (folders for training, predict, --calib): torchvision's ImageFolder list.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

ImageSource = Union[str, "os.PathLike[str]", IO[bytes]]

_UINT16_MAX = 65535
# warnings.catch_warnings swaps process-wide state; one lock keeps our own threads (the parallel
# up-front check of --skip-bad-images) from restoring each other's filters.
_WARNINGS_LOCK = threading.Lock()


class ImageTooLargeError(DataError):
    """An image's header gives more pixels than the cap allows; nothing was decoded."""


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _name(source: ImageSource) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return str(getattr(source, "name", "(in memory)"))


def _grey_to_rgb(grey: np.ndarray) -> Image.Image:
    return Image.fromarray(grey.astype(np.uint8)).convert("RGB")  # 2-D uint8: mode L


def _scale_uint16(values: np.ndarray) -> np.ndarray:
    return np.rint(values.astype(np.float64) * (255.0 / _UINT16_MAX))


def _int_to_rgb(image: Image.Image) -> Image.Image:
    values = np.asarray(image)
    if image.mode == "I" and values.size and (values.min() < 0 or values.max() > _UINT16_MAX):
        raise DataError(f"32-bit integer image with values {values.min()}..{values.max()}, outside the 16-bit "
                        f"range 0..{_UINT16_MAX} surgeon reads; save it as an 8- or 16-bit image")
    return _grey_to_rgb(_scale_uint16(values))


def _float_to_rgb(image: Image.Image) -> Image.Image:
    values = np.asarray(image, dtype=np.float64)
    finite = values[np.isfinite(values)]
    top = finite.max() if finite.size else 0.0
    scale = 255.0 if top <= 1.0 else 1.0  # 0..1 data (scientific, HDR tools) vs 0..255 (PIL's own "F")
    return _grey_to_rgb(np.rint(np.nan_to_num(values * scale, nan=0.0, posinf=255.0, neginf=0.0).clip(0, 255)))


def to_rgb(image: Image.Image) -> Image.Image:
    """A new 8-bit RGB image from any PIL image, by the rules above (a copy, like ``convert``, so it
    outlives the file the input was opened from)."""
    mode = image.mode
    if mode == "RGB":
        return image.copy()
    if mode.startswith("I"):  # I, I;16, I;16L, I;16B, I;16N
        return _int_to_rgb(image)
    if mode == "F":
        return _float_to_rgb(image)
    if mode == "P" and "transparency" in image.info:
        # Via RGBA, which PIL asks for ("Palette images with Transparency ... should be converted to
        # RGBA"); dropping alpha then gives the palette colours, as a direct conversion would.
        return image.convert("RGBA").convert("RGB")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise DataError(f"cannot convert a mode {mode} image to RGB ({_one_line(exc)}); save it as RGB") from exc


def check_pixels(size: tuple[int, int], max_pixels: int, name: str) -> None:
    """Refuse ``size`` (width, height) over ``max_pixels`` (0 = no cap) with a one-line error."""
    width, height = size
    if max_pixels and width * height > max_pixels:
        raise ImageTooLargeError(
            f"image {name} is {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,} "
            f"(--max-image-pixels); shrink it or raise --max-image-pixels (0 = no limit)"
        )


def _open_header(source: ImageSource) -> Image.Image:
    # Our own cap replaces PIL's DecompressionBombWarning (a raw warning with a source line, and a
    # limit that --max-image-pixels should set, not PIL's global).
    with _WARNINGS_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(source)


def _decode(image: Image.Image) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    if limit is None or image.width * image.height <= limit:
        image.load()  # the common case, decoded in parallel
        return
    with _WARNINGS_LOCK, warnings.catch_warnings():  # TIFF and GIF repeat PIL's check while decoding
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image.load()


def open_image(source: ImageSource, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, *,
               name: str | None = None) -> Image.Image:
    """Decode an image file (a path or a binary file object) fully into 8-bit RGB; ``name`` is what
    errors call it (default: the path, or the file object's name).

    Raises a one-line :class:`DataError` naming the file if it cannot be read, and
    :class:`ImageTooLargeError` before decoding if it has more than ``max_pixels`` pixels (0 = no
    cap; PIL's own hard limit, twice ``PIL.Image.MAX_IMAGE_PIXELS``, still applies).
    """
    name = name or _name(source)
    try:
        with _open_header(source) as image:
            check_pixels(image.size, max_pixels, name)
            # load() decodes now: a truncated file fails here, naming the file, not later inside a
            # transform with a bare PIL traceback.
            _decode(image)
            return to_rgb(image)
    except ImageTooLargeError:
        raise
    except Image.DecompressionBombError as exc:
        # Raised by Image.open itself, before our check, over twice PIL.Image.MAX_IMAGE_PIXELS.
        raise ImageTooLargeError(f"image {name} is too large to decode: {_one_line(exc)}; shrink it") from exc
    except DataError as exc:
        raise DataError(f"cannot read image {name}: {exc}") from exc
    except Exception as exc:  # PIL raises many types for corrupt input (OSError, SyntaxError, ...)
        raise DataError(f"cannot read image {name}: {_one_line(exc)}") from exc
