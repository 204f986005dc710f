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
