"""Decoding of 8/16-bit PNG, TIFF, JPEG; one-line errors for bad files."""

import io

import numpy as np
import pytest
import tifffile
from PIL import Image

from ray_inspect.io.images import decode, read_image, read_mask, resize_image
from ray_inspect.records import InputError


def png(arr, **kw):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", **kw)
    return buf.getvalue()


def test_bit_depths_and_formats(tmp_path):
    a8 = (np.arange(64 * 64) % 256).astype(np.uint8).reshape(64, 64)
    np.testing.assert_allclose(decode(png(a8), "a.png"), a8 / 255.0, atol=1e-7)
    a16 = (np.arange(64 * 64) * 13 % 65536).astype(np.uint16).reshape(64, 64)
    np.testing.assert_allclose(decode(png(a16), "a.png"), a16 / 65535.0, atol=1e-7)
    buf = io.BytesIO()
    tifffile.imwrite(buf, a16)
    np.testing.assert_allclose(decode(buf.getvalue(), "a.tif"), a16 / 65535.0, atol=1e-7)
    f32 = np.random.default_rng(0).random((40, 30)).astype(np.float32)
    buf = io.BytesIO()
    tifffile.imwrite(buf, f32)
    np.testing.assert_array_equal(decode(buf.getvalue(), "a.tiff"), f32)
    rgb = np.random.default_rng(1).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=95)
    gray = decode(buf.getvalue(), "a.jpg")
    assert gray.shape == (32, 48) and gray.min() >= 0 and gray.max() <= 1
    colour = decode(png(rgb), "a.png", channels=3)
    np.testing.assert_allclose(colour, rgb / 255.0, atol=1e-7)
    assert decode(png(a8), "a.png", channels=3).shape == (64, 64, 3)


@pytest.mark.parametrize("data,fragment", [
    (b"", "empty file"),
    (b"this is not an image at all", "not an image"),
    (png(np.zeros((64, 64), np.uint8))[:60], "corrupt or truncated"),
])
def test_bad_files_give_one_line_errors(data, fragment):
    with pytest.raises(InputError) as err:
        decode(data, "s3://bucket/x.png")
    msg = str(err.value)
    assert msg.startswith("s3://bucket/x.png: ") and fragment in msg and "\n" not in msg


def test_nan_tiff_and_missing_url(tmp_path):
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.full((8, 8), np.nan, np.float32))
    with pytest.raises(InputError, match="NaN"):
        decode(buf.getvalue(), "n.tif")
    with pytest.raises(InputError, match="no such file"):
        read_image(str(tmp_path / "missing.png"))


def test_mask_size_mismatch(tmp_path):
    p = tmp_path / "m.png"
    p.write_bytes(png(np.zeros((10, 12), np.uint8)))
    with pytest.raises(InputError, match="mask is 12x10, image is 20x20"):
        read_mask(str(p), (20, 20))


def test_resize_keeps_range():
    img = np.random.default_rng(0).random((512, 512)).astype(np.float32)
    out = resize_image(img, 256)
    assert out.shape == (256, 256) and out.dtype == np.float32 and out.min() >= 0 and out.max() <= 1
    assert resize_image(img, None) is img


def test_peek_shape_reads_the_header_only(tmp_path):
    import io as _io

    import tifffile as _tf
    from PIL import Image as _Image

    from ray_inspect.io.images import decode_raw, peek_shape

    rng = np.random.default_rng(0)
    cases = {
        "g.png": rng.integers(0, 255, (37, 53), dtype=np.uint8),
        "c.jpg": rng.integers(0, 255, (40, 30, 3), dtype=np.uint8),
        "i.tiff": rng.random((33, 21, 3)).astype(np.float32),
        "p.tiff": rng.integers(0, 65535, (3, 25, 19), dtype=np.uint16),     # planar RGB
        "m.tiff": rng.integers(0, 255, (27, 31), dtype=np.uint8),
    }
    for name, arr in cases.items():
        buf = _io.BytesIO()
        if name.endswith(".tiff"):
            _tf.imwrite(buf, arr, photometric="rgb" if arr.ndim == 3 else "minisblack",
                        planarconfig="separate" if name == "p.tiff" else None)
        else:
            _Image.fromarray(arr).save(buf, format="PNG" if name.endswith(".png") else "JPEG")
        data = buf.getvalue()
        assert peek_shape(data, name) == decode_raw(data, name).shape[:2], name
        assert peek_shape(data[:10], name) is None or name.endswith(".jpg")
    assert peek_shape(b"", "x.png") is None and peek_shape(b"not an image", "x.tiff") is None


_BOMB_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[1])
from helpers import bombs
from ray_inspect.io.images import decode_raw
from ray_inspect.records import InputError
for name, data in [("png", bombs.png_bomb()), ("jpeg", bombs.jpeg_bomb()), ("tiff", bombs.tiff_bomb()),
                   ("pages", bombs.tiff_bomb(pages=2000))]:
    try:
        decode_raw(data, name + ".img")
        print(name, "decoded")
    except InputError as exc:
        print(name, exc.kind, len(data))
# VmHWM: this process image's peak (ru_maxrss would carry the forking parent's peak across exec)
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print("maxrss", int(hwm.split()[1]) * 1024)
"""


def test_bombs_are_refused_from_their_headers_in_bounded_memory():
    """Headers of 2^32 pixels (PNG, JPEG at its 65,535^2 maximum, a deflate TIFF whose 4,096 strips
    all point at one compressed strip, 2,000 such pages): ``size``, decided before any pixel is
    decoded; the process's peak RSS, measured by the kernel (VmHWM), stays under 300 MB."""
    import os
    import subprocess
    import sys

    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", _BOMB_SCRIPT, tests], capture_output=True, text=True,
                         timeout=120, check=True).stdout.split("\n")
    kinds = {line.split()[0]: line.split()[1] for line in out if line and not line.startswith("maxrss")}
    assert kinds == {"png": "size", "jpeg": "size", "tiff": "size", "pages": "size"}, out
    sizes = {line.split()[0]: int(line.split()[2]) for line in out if line and not line.startswith("maxrss")}
    assert sizes["tiff"] < 1 << 20                     # under 1 MB on disk, 4 GiB inflated
    maxrss = int(next(line for line in out if line.startswith("maxrss")).split()[1])
    assert maxrss < 300 << 20, maxrss


def test_max_pixels_is_the_limit_from_the_header():
    from ray_inspect.io.images import decode_raw

    data = png(np.zeros((100, 120), np.uint8))
    assert decode_raw(data, "a.png", max_pixels=12_000).shape == (100, 120)
    with pytest.raises(InputError, match="100x120|120x100") as err:
        decode_raw(data, "a.png", max_pixels=11_999)
    assert err.value.kind == "size" and "--max-pixels" in str(err.value)


def test_deep_colour_png_keeps_16_bits():
    """A 16-bit RGB (and RGBA, grey+alpha) PNG written by hand: the decoded pixels are the array
    that was written, all 16 bits (Pillow alone would cut them to 8)."""
    from helpers.bombs import png_bytes
    from ray_inspect.io.images import decode_raw

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 65536, (33, 47, 3), dtype=np.uint16)
    got = decode_raw(png_bytes(rgb), "deep.png")
    assert got.dtype == np.uint16 and np.array_equal(got, rgb)
    rgba = rng.integers(0, 65536, (9, 11, 4), dtype=np.uint16)
    assert np.array_equal(decode_raw(png_bytes(rgba), "rgba.png"), rgba[..., :3])
    grey_alpha = rng.integers(0, 65536, (9, 11, 2), dtype=np.uint16)
    got = decode_raw(png_bytes(grey_alpha), "la.png")
    assert np.array_equal(got if got.ndim == 2 else got[..., 0], grey_alpha[..., 0])
    assert np.array_equal(decode(png_bytes(rgb), "deep.png", channels=3), rgb / np.float32(65535.0))


def test_multi_page_tiff_is_read_from_page_zero():
    """Three grey pages (an ImageJ-style stack) are not an RGB image: page 0 as tifffile reads it."""
    from ray_inspect.io.images import decode_raw

    pages = np.random.default_rng(1).integers(0, 256, (3, 40, 50), dtype=np.uint8)
    for kw in ({}, {"imagej": True}):
        buf = io.BytesIO()
        tifffile.imwrite(buf, pages, photometric="minisblack", **kw)
        ref = tifffile.imread(io.BytesIO(buf.getvalue()), key=0)
        got = decode_raw(buf.getvalue(), "stack.tiff")
        assert got.shape == (40, 50) and np.array_equal(got, ref) and np.array_equal(got, pages[0])


@pytest.mark.parametrize("mode", ["L", "RGB", "P"])
def test_bmp_is_accepted_as_pillow_reads_it(mode):
    from ray_inspect.io.images import decode_raw, is_image

    arr = np.random.default_rng(2).integers(0, 256, (21, 30, 3), dtype=np.uint8)
    im = Image.fromarray(arr).convert(mode)
    buf = io.BytesIO()
    im.save(buf, format="BMP")
    ref = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB" if mode != "L" else "L"))
    assert is_image("cam/0001.BMP") and np.array_equal(decode_raw(buf.getvalue(), "cam/0001.bmp"), ref)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "EPS", "ICO", "PDF"])
def test_formats_outside_the_allow_list_are_refused_whatever_their_name(fmt):
    buf = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(buf, format=fmt)
    with pytest.raises(InputError) as err:
        decode(buf.getvalue(), "looks-fine.png")
    assert err.value.kind == "format" and "\n" not in str(err.value)


def test_a_file_too_large_for_the_limit_is_refused_from_its_listed_size():
    from ray_inspect.io.datasets import Sample
    from ray_inspect.io.images import check_bytes

    sample = Sample("s3://b/huge.tiff", "huge.tiff", version="9000000123-abc")
    assert sample.listed_bytes == 9_000_000_123 and Sample("a", "a", version="-x").listed_bytes is None
    check_bytes(8 * 1000 + (1 << 20), sample.url, max_pixels=1000)
    with pytest.raises(InputError, match="more than an image within") as err:
        check_bytes(sample.listed_bytes, sample.url, max_pixels=1 << 30)
    assert err.value.kind == "size"


@pytest.mark.parametrize("src,dst,colour", [((500, 1250), (256, 640), False), ((97, 131), (50, 60), True),
                                            ((64, 64), (100, 90), False), ((1000, 37), (333, 20), True)])
def test_banded_resize_equals_skimage(src, dst, colour):
    """The banded resize (native pixels converted a band at a time) against skimage's whole-image
    resize of the converted image: equal to float32 rounding, downscaling and upscaling."""
    from skimage.transform import resize as sk_resize

    from ray_inspect.io.images import to_float

    raw = np.random.default_rng(3).integers(0, 65536, src + ((3,) if colour else ()), dtype=np.uint16)
    for channels in (1, 3):
        ref = sk_resize(to_float(raw, channels), dst + ((3,) if channels == 3 else ()), order=1,
                        anti_aliasing=True, preserve_range=True)
        got = resize_image(raw, dst, channels=channels)
        assert got.dtype == np.float32 and got.shape == ref.shape
        np.testing.assert_allclose(got, np.clip(ref, 0, 1), atol=3e-7)


def test_scaled_image_rows_equal_the_whole_resize():
    from ray_inspect.io.images import ScaledImage, resize_rows

    raw = np.random.default_rng(4).integers(0, 256, (301, 177, 3), dtype=np.uint8)
    whole = resize_image(raw, (150, 88), channels=1)
    lazy = ScaledImage(raw, (150, 88), 1)
    assert lazy.shape == (150, 88) and np.array_equal(np.asarray(lazy), whole)
    for r0, r1 in [(0, 1), (17, 60), (149, 150), (0, 150)]:
        assert np.array_equal(lazy[r0:r1], whole[r0:r1])
        assert np.array_equal(resize_rows(raw, (150, 88), (r0, r1), 1), whole[r0:r1])


def test_tiff_samples_and_decoded_bytes_are_checked_before_decoding():
    """Pixels alone do not bound a TIFF: 64 samples per pixel is refused as ``mode``, and a float64
    RGB page whose decoded bytes exceed 8 per allowed pixel as ``size``, both from the tags."""
    from ray_inspect.io.images import decode_raw

    buf = io.BytesIO()
    tifffile.imwrite(buf, np.zeros((10, 10, 64), np.uint8), photometric="minisblack", planarconfig="contig")
    with pytest.raises(InputError, match="64 samples per pixel") as err:
        decode_raw(buf.getvalue(), "wide.tiff")
    assert err.value.kind == "mode"
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.zeros((40, 50, 3), np.float64), photometric="rgb")
    with pytest.raises(InputError, match="bytes decoded") as err:
        decode_raw(buf.getvalue(), "deep.tiff", max_pixels=40 * 50 * 2)    # 2,000 px allowed, 48,000 B
    assert err.value.kind == "size"
    assert decode_raw(buf.getvalue(), "deep.tiff", max_pixels=40 * 50 * 3).shape == (40, 50, 3)


def test_an_empty_slice_of_a_scaled_image_is_empty():
    from ray_inspect.io.images import ScaledImage

    lazy = ScaledImage(np.zeros((50, 40), np.uint8), (25, 20), 1)
    assert lazy[3:3].shape == (0, 20) and lazy[30:40].shape == (0, 20)
