"""surgeon.imageio: every image mode decodes to the 8-bit RGB a model expects, and oversized images
are refused from their header, before decoding (predict and training data alike)."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from surgeon.errors import DataError
from surgeon.imageio import DEFAULT_MAX_IMAGE_PIXELS, ImageTooLargeError, open_image, to_rgb

# ------------------------------------------------------------------------------------------------
# helpers


def _png(width: int, height: int, bit_depth: int, color_type: int, pixels: np.ndarray | None) -> bytes:
    """A PNG written by hand: PIL cannot write 48/64-bit colour PNGs, and a header-only PNG (pixels
    None) claims any size without holding the data, so only a header check can refuse it quickly."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    if pixels is None:
        raw = b"\x00" * 16
    else:
        dtype = ">u2" if bit_depth == 16 else "u1"
        raw = b"".join(b"\x00" + row.astype(dtype).tobytes() for row in pixels)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _save(image: Image.Image, path: Path, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


def _mode(path: Path) -> str:
    with Image.open(path) as image:
        return image.mode


def _rgb(path_or_image) -> np.ndarray:
    image = open_image(path_or_image) if not isinstance(path_or_image, Image.Image) else to_rgb(path_or_image)
    assert image.mode == "RGB"
    out = np.asarray(image)
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    return out


@pytest.fixture(autouse=True)
def _warnings_are_errors():
    # Decoding must never need a warning (PIL's palette or decompression-bomb ones) to be right.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


RAMP16 = np.array([[0, 257, 32768, 65535], [1000, 20000, 40000, 60000]], dtype=np.uint16)
RAMP16_AS_8 = np.rint(RAMP16 / 65535 * 255).astype(np.uint8)  # full-range scaling, not min-max


# ------------------------------------------------------------------------------------------------
# high bit depth


def test_16_bit_grey_png_is_scaled_by_the_full_range(tmp_path):
    path = _save(Image.fromarray(RAMP16), tmp_path / "g16.png")
    assert _mode(path) == "I;16"  # what PIL gives; its convert("RGB") made this all 255
    out = _rgb(path)
    np.testing.assert_array_equal(out, np.repeat(RAMP16_AS_8[..., None], 3, axis=2))


def test_dark_16_bit_image_stays_dark(tmp_path):
    # min-max stretching would make this black-to-white; full-range scaling keeps it near black.
    dark = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 10)
    out = _rgb(_save(Image.fromarray(dark), tmp_path / "dark.png"))
    assert out.max() <= 3


def test_16_bit_grey_tiff_and_pgm(tmp_path):
    tiff = _save(Image.fromarray(RAMP16), tmp_path / "g16.tif")
    pgm = tmp_path / "g16.pgm"
    pgm.write_bytes(b"P5\n4 2\n65535\n" + RAMP16.astype(">u2").tobytes())
    assert _mode(pgm) == "I"  # PIL's 32-bit mode for 16-bit data
    for path in (tiff, pgm):
        np.testing.assert_array_equal(_rgb(path)[..., 0], RAMP16_AS_8)


@pytest.mark.parametrize("color_type, channels", [(2, 3), (6, 4)], ids=["rgb48", "rgba64"])
def test_16_bit_colour_png(tmp_path, color_type, channels):
    values = np.random.default_rng(0).integers(0, 65536, (6, 5, channels)).astype(np.uint16)
    path = tmp_path / "c16.png"
    path.write_bytes(_png(5, 6, 16, color_type, values.reshape(6, -1)))
    out = _rgb(path).astype(int)
    assert np.abs(out - values[..., :3] / 65535 * 255).max() <= 1  # PIL keeps the high byte


def test_32_bit_int_tiff(tmp_path):
    fits = _save(Image.fromarray(RAMP16.astype(np.int32)), tmp_path / "i32.tif")
    assert _mode(fits) == "I"
    np.testing.assert_array_equal(_rgb(fits)[..., 0], RAMP16_AS_8)
    wide = _save(Image.fromarray(np.array([[0, 70000], [-5, 3]], dtype=np.int32)), tmp_path / "wide.tif")
    with pytest.raises(DataError) as err:
        open_image(wide)
    message = str(err.value)
    assert "wide.tif" in message and "32-bit" in message and "0..65535" in message and "\n" not in message


def test_float_tiff_rules(tmp_path):
    unit = np.array([[0.0, 0.25, 0.5, 1.0]], dtype=np.float32)  # max <= 1: taken as 0..1
    np.testing.assert_array_equal(_rgb(_save(Image.fromarray(unit), tmp_path / "u.tif"))[0, :, 0], [0, 64, 128, 255])
    byte = np.array([[0.0, 100.0, 254.6, 300.0, -4.0]], dtype=np.float32)  # max > 1: taken as 0..255, clipped
    out = _rgb(_save(Image.fromarray(byte), tmp_path / "b.tif"))
    np.testing.assert_array_equal(out[0, :, 0], [0, 100, 255, 255, 0])
    nan = np.array([[np.nan, 0.5]], dtype=np.float32)
    assert _mode(_save(Image.fromarray(nan), tmp_path / "n.tif")) == "F"
    np.testing.assert_array_equal(_rgb(tmp_path / "n.tif")[0, :, 0], [0, 128])


# ------------------------------------------------------------------------------------------------
# 8-bit modes (alpha dropped, as torchvision's loader does)


def _palette(transparency: int | None) -> Image.Image:
    p = Image.fromarray(np.array([[0, 1], [1, 0]], dtype=np.uint8), mode="P")
    p.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    if transparency is not None:
        p.info["transparency"] = transparency
    return p


@pytest.mark.parametrize("transparency", [None, 0], ids=["opaque", "transparent"])
def test_palette_png(tmp_path, transparency):
    path = _save(_palette(transparency), tmp_path / "p.png")
    assert _mode(path) == "P"
    out = _rgb(path)
    assert out[0, 0].tolist() == [10, 20, 30] and out[0, 1].tolist() == [200, 100, 50]


def test_palette_gif_with_transparency(tmp_path):
    path = _save(_palette(0), tmp_path / "p.gif", transparency=0)
    out = _rgb(path)
    assert out[0, 1].tolist() == [200, 100, 50] and out[0, 0].tolist() == [10, 20, 30]


def test_alpha_is_dropped_consistently(tmp_path):
    rgba = Image.new("RGBA", (2, 2), (10, 20, 30, 0))
    la = Image.new("LA", (2, 2), (90, 0))
    assert _rgb(_save(rgba, tmp_path / "a.png"))[0, 0].tolist() == [10, 20, 30]
    assert _rgb(_save(la, tmp_path / "la.png"))[0, 0].tolist() == [90, 90, 90]
    la16 = tmp_path / "la16.png"
    la16.write_bytes(_png(1, 1, 16, 4, np.array([[30000, 0]], dtype=np.uint16)))
    assert np.abs(_rgb(la16)[0, 0].astype(int) - 30000 / 65535 * 255).max() <= 1


def test_cmyk_jpeg_and_1_bit(tmp_path):
    cmyk = _save(Image.new("CMYK", (8, 8), (255, 0, 0, 0)), tmp_path / "c.jpg", quality=100)
    assert _mode(cmyk) == "CMYK"
    assert np.abs(_rgb(cmyk)[4, 4].astype(int) - [0, 255, 255]).max() <= 3  # cyan
    bits = Image.fromarray(np.array([[True, False]]))
    path = _save(bits, tmp_path / "b.png")
    assert _mode(path) == "1"
    assert _rgb(path)[0].tolist() == [[255, 255, 255], [0, 0, 0]]


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "YCbCr", "I", "I;16", "F", "HSV"])
def test_to_rgb_gives_8_bit_rgb_for_every_mode(mode):
    assert _rgb(Image.new(mode, (3, 2))).shape == (2, 3, 3)


def test_rgb_is_unchanged_and_file_objects_work(tmp_path):
    values = np.random.default_rng(1).integers(0, 256, (5, 4, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(values).save(buf, format="PNG")
    buf.seek(0)
    np.testing.assert_array_equal(_rgb(buf), values)
    with Image.open(_save(Image.fromarray(values), tmp_path / "rgb.png")) as lazy:
        rgb = to_rgb(lazy)
    np.testing.assert_array_equal(np.asarray(rgb), values)  # a copy: usable after the file is closed
    with pytest.raises(DataError, match=r"^cannot read image the request body: "):
        open_image(io.BytesIO(b"not an image"), name="the request body")
    with pytest.raises(DataError, match=r"^cannot read image \(in memory\): "):
        open_image(io.BytesIO(b"not an image"))


# ------------------------------------------------------------------------------------------------
# size cap


def test_default_cap_is_64_megapixels():
    assert DEFAULT_MAX_IMAGE_PIXELS == 64_000_000


def test_oversized_image_is_refused_from_its_header(tmp_path):
    # 12000x12000 would be 432 MB decoded; the file holds a few bytes of data, so anything that tried
    # to decode it would fail differently (and PIL alone would only warn).
    path = tmp_path / "bomb.png"
    path.write_bytes(_png(12000, 12000, 8, 0, None))
    with pytest.raises(ImageTooLargeError) as err:
        open_image(path)
    message = str(err.value)
    assert "bomb.png" in message and "12000x12000" in message and "--max-image-pixels" in message
    assert "\n" not in message and isinstance(err.value, DataError)


def test_cap_is_configurable_and_0_lifts_it(tmp_path):
    path = _save(Image.new("RGB", (100, 50)), tmp_path / "small.png")
    with pytest.raises(ImageTooLargeError, match="100x50"):
        open_image(path, max_pixels=4999)
    assert open_image(path, max_pixels=5000).size == (100, 50)
    assert open_image(path, max_pixels=0).size == (100, 50)


def test_pils_own_limits_become_one_line_errors(tmp_path):
    # Over PIL's warning limit, with our cap lifted: no DecompressionBombWarning escapes (warnings
    # are errors here), the truncated data is what fails.
    over_warning = tmp_path / "w.png"
    over_warning.write_bytes(_png(10000, 10000, 8, 0, None))
    assert 10000 * 10000 > Image.MAX_IMAGE_PIXELS
    with pytest.raises(DataError) as err:
        open_image(over_warning, max_pixels=0)
    assert "decompression bomb" not in str(err.value) and "w.png" in str(err.value)
    # Over PIL's hard limit, which Image.open raises before our check: still one DataError line.
    huge = tmp_path / "huge.png"
    huge.write_bytes(_png(20000, 20000, 8, 0, None))
    for cap in (0, DEFAULT_MAX_IMAGE_PIXELS):
        with pytest.raises(ImageTooLargeError) as err:
            open_image(huge, max_pixels=cap)
        assert "huge.png" in str(err.value) and "\n" not in str(err.value)


def test_module_does_not_import_torch():
    code = "import sys, surgeon.imageio; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------------------
# predict


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory) -> Path:
    from surgeon.export.onnx_export import export_checkpoint
    from surgeon.grow.recipe import GrowStep
    from tests.export.test_onnx_export import _grown_checkpoint

    d = tmp_path_factory.mktemp("imageio_predict")
    ckpt = _grown_checkpoint(d / "grown.pt", [GrowStep("wide", "classifier.0", 8)])
    return export_checkpoint(ckpt, d / "model.onnx").path


def test_predict_refuses_an_oversized_image_by_name_and_predicts_the_rest(onnx_model, tmp_path):
    from surgeon.cli import cli

    (tmp_path / "bomb.png").write_bytes(_png(12000, 12000, 8, 0, None))
    _save(Image.new("RGB", (40, 40), (200, 10, 10)), tmp_path / "ok.png")
    res = CliRunner().invoke(cli, ["predict", str(onnx_model), str(tmp_path), "--json"])
    assert res.exit_code == 1
    doc = json.loads(res.stdout)
    assert [Path(p["image"]).name for p in doc["predictions"]] == ["ok.png"]
    [error] = doc["errors"]
    assert "12000x12000" in error["error"] and "--max-image-pixels" in error["error"]
    res = CliRunner().invoke(cli, ["predict", str(onnx_model), str(tmp_path / "ok.png"), "--max-image-pixels", "1000"])
    assert res.exit_code == 1 and "40x40" in res.stderr
    res = CliRunner().invoke(cli, ["predict", str(onnx_model), str(tmp_path / "ok.png"), "--max-image-pixels", "0"])
    assert res.exit_code == 0 and "ok.png: " in res.stdout


def test_predict_sees_a_16_bit_image_as_it_looks(onnx_model, tmp_path):
    from surgeon.runtime import Session

    grey16 = np.full((40, 40), 20000, dtype=np.uint16)
    path = _save(Image.fromarray(grey16), tmp_path / "g16.png")
    session = Session(onnx_model)
    want = session.predict([np.full((40, 40, 3), round(20000 / 65535 * 255), np.uint8)], topk=4)[0]
    got = session.predict([open_image(path)], topk=4)[0]
    assert [p.index for p in got] == [p.index for p in want]
    np.testing.assert_allclose([p.score for p in got], [p.score for p in want], rtol=1e-5)


def test_session_predict_scales_a_16_bit_pil_image_like_its_8_bit_version(tmp_path):
    import numpy as np
    from PIL import Image

    from surgeon.runtime.session import Session
    from tests.conftest import DIGITNET

    session = Session(DIGITNET, backend="torch")
    rng = np.random.default_rng(0)
    grey8 = rng.integers(0, 256, (32, 32), dtype=np.uint8)
    grey16 = Image.fromarray((grey8.astype(np.uint16) * 257).astype(np.uint16))  # v * 65535 / 255, exactly
    assert grey16.mode.startswith("I")
    a, b = session.preprocess([grey16]), session.preprocess([Image.fromarray(grey8)])
    np.testing.assert_array_equal(a, b)
