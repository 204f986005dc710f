"""Decode and encode images: 8/16-bit PNG, TIFF (integer or float), JPEG, BMP -> float32 in [0, 1]."""

from __future__ import annotations

import io
import logging
import os

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError
from scipy import ndimage as ndi
from skimage.color import rgb2gray
from skimage.transform import resize as sk_resize

from ray_inspect.config import InspectConfig
from ray_inspect.io import storage
from ray_inspect.records import FailureKind, InputError

IMAGE_EXTENSIONS = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
IMAGE_FORMATS = ("PNG", "TIFF", "JPEG", "BMP")     # what those names are, for messages
# The decoder front door: the format comes from the first bytes, not the name, and only these are
# decoded; the pixel count comes from the header and is checked before any pixel is decoded.
_MAGIC = (("PNG", (b"\x89PNG\r\n\x1a\n",)), ("JPEG", (b"\xff\xd8\xff",)),
          ("TIFF", (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")), ("BMP", (b"BM",)))
DEFAULT_MAX_PIXELS = InspectConfig.max_pixels   # 1 Gpx; --max-pixels changes it
BYTES_PER_PIXEL_MAX = 8           # 16-bit RGBA, uncompressed: no valid image within the limit is larger
Image.MAX_IMAGE_PIXELS = None     # Pillow's own guard (at twice its limit, after parsing) is replaced by ours
logging.getLogger("tifffile").setLevel(logging.ERROR)   # a damaged TIFF is one InputError, not log lines


def is_image(url: str) -> bool:
    return url.lower().endswith(IMAGE_EXTENSIONS)


def _check_pixels(arr: np.ndarray, url: str) -> np.ndarray:
    """Accept the pixel types we can scale to [0, 1]; float images must be finite and in range."""
    if arr.dtype in (np.uint8, np.uint16, bool):
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float32, copy=False)
        if not np.isfinite(arr).all():
            raise InputError(url, "image contains NaN or infinite values", FailureKind.NAN)
        if arr.min() < 0 or arr.max() > 1:
            raise InputError(url, f"float image values outside [0, 1] ({arr.min():.3g}..{arr.max():.3g})",
                             FailureKind.RANGE)
        return arr
    raise InputError(url, f"unsupported pixel type {arr.dtype}", FailureKind.MODE)


def _layout(arr: np.ndarray, url: str) -> np.ndarray:
    """(H, W) or (H, W, 3): planar TIFFs moved to channels-last, alpha and singleton channels dropped."""
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[-1] == 4:
        arr = arr[..., :3]
    if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] == 3):
        return arr
    raise InputError(url, f"unsupported image shape {arr.shape}", FailureKind.MODE)


def to_float(arr: np.ndarray, channels: int = 1) -> np.ndarray:
    """Native pixels (all or some rows of a decoded image) -> float32 in [0, 1] with ``channels``.

    Pixel-wise, so converting a band of rows gives exactly those rows of the whole conversion.
    """
    arr = np.asarray(arr)
    if arr.dtype == np.uint8:
        out = arr.astype(np.float32) / 255.0
    elif arr.dtype == np.uint16:
        out = arr.astype(np.float32) / 65535.0
    else:
        out = arr.astype(np.float32)
    if out.ndim == 2:
        return out if channels == 1 else np.repeat(out[..., None], 3, axis=-1)
    return rgb2gray(out).astype(np.float32) if channels == 1 else out


def sniff(data: bytes, url: str) -> str:
    """The file's format from its first bytes: PNG, JPEG, TIFF or BMP; anything else is refused."""
    if not data:
        raise InputError(url, "empty file (0 bytes)", FailureKind.EMPTY)
    for fmt, magics in _MAGIC:
        if data.startswith(magics):
            return fmt
    raise InputError(url, f"not an image of an accepted format (PNG, JPEG, TIFF, BMP); first bytes "
                     f"{data[:8].hex()}", FailureKind.FORMAT)


def check_pixels(height: int, width: int, url: str, max_pixels: int = DEFAULT_MAX_PIXELS,
                 where: str = "") -> None:
    """Refuse, from the header's size alone, an image with no pixels or more than ``max_pixels``
    (``where``: e.g. "at the model's processing size", when the size is not the stored one)."""
    if height < 1 or width < 1:
        raise InputError(url, f"image has no pixels ({width}x{height})", FailureKind.EMPTY)
    if height * width > max_pixels:
        at = f" {where}" if where else ""
        raise InputError(url, f"{width}x{height}{at} is {height * width / 1e6:,.0f} Mpx, over the limit of "
                         f"{max_pixels / 1e6:,.0f} Mpx (--max-pixels)", FailureKind.SIZE)


def check_bytes(nbytes: int | None, url: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Refuse, from the listing's size alone (before fetching it), a file larger than any image
    within ``max_pixels`` can be."""
    if nbytes is not None and nbytes > BYTES_PER_PIXEL_MAX * max_pixels + (1 << 20):
        raise InputError(url, f"file is {nbytes:,} bytes, more than an image within the limit of "
                         f"{max_pixels / 1e6:,.0f} Mpx can take (--max-pixels)", FailureKind.SIZE)


def _tiff_page(tif: tifffile.TiffFile, url: str, max_pixels: int) -> tifffile.TiffPage:
    """Page 0 of a TIFF (further pages are ignored), checked from its tags before it is decoded:
    not a volume, at most 4 samples per pixel, within the pixel and byte limits."""
    page = tif.pages.first
    if getattr(page, "imagedepth", 1) > 1:
        raise InputError(url, f"volumetric TIFF page (depth {page.imagedepth})", FailureKind.MODE)
    if page.samplesperpixel > 4:
        raise InputError(url, f"TIFF with {page.samplesperpixel} samples per pixel", FailureKind.MODE)
    check_pixels(page.imagelength, page.imagewidth, url, max_pixels)
    nbytes = int(np.prod(page.shape, dtype=np.int64)) * (page.dtype.itemsize if page.dtype else 8)
    if nbytes > BYTES_PER_PIXEL_MAX * max_pixels:
        raise InputError(url, f"TIFF page of {nbytes:,} bytes decoded, over the limit (--max-pixels)",
                         FailureKind.SIZE)
    return page


def _png_deep_colour(data: bytes) -> bool:
    """A 16-bit PNG with colour or alpha (IHDR bit depth 16, colour type 2, 4 or 6), which Pillow
    would cut to 8 bits."""
    return len(data) > 25 and data[12:16] == b"IHDR" and data[24] == 16 and data[25] in (2, 4, 6)


def _decode_deep_png(data: bytes, url: str) -> np.ndarray:
    os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(1 << 40))   # ours was checked already
    import cv2

    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise InputError(url, "corrupt or truncated image (16-bit PNG)", FailureKind.CORRUPT)
    return arr[..., 2::-1] if arr.ndim == 3 else arr     # BGR(A) -> RGB, alpha dropped


def _decode_pillow(data: bytes, url: str, fmt: str, max_pixels: int) -> np.ndarray:
    with Image.open(io.BytesIO(data), formats=[fmt]) as im:
        check_pixels(im.height, im.width, url, max_pixels)
        if fmt == "PNG" and _png_deep_colour(data):
            return _decode_deep_png(data, url)
        if im.mode in ("I", "F"):
            raise InputError(url, f"unsupported {fmt} mode {im.mode}", FailureKind.MODE)
        im.load()
        if im.mode in ("P", "PA", "LA", "CMYK", "YCbCr", "HSV", "LAB", "1", "RGBX"):
            im = im.convert("RGB" if im.mode not in ("LA", "1") else "L")
        if im.mode.startswith("I;16"):
            return np.array(im, dtype=np.uint16)
        return np.asarray(im)


def decode_raw(data: bytes, url: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Bytes of a PNG/JPEG/TIFF/BMP -> validated pixels in their own type (uint8, uint16, bool or
    float32), (H, W) or (H, W, 3). A TIFF is read from page 0. A large image stays compact until
    ``to_float`` on a band."""
    fmt = sniff(data, url)
    try:
        if fmt == "TIFF":
            with tifffile.TiffFile(io.BytesIO(data)) as tif:
                arr = _tiff_page(tif, url, max_pixels).asarray()
        else:
            arr = _decode_pillow(data, url, fmt, max_pixels)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure is bad input
        reason = "cannot identify the image" if isinstance(exc, UnidentifiedImageError) else \
            storage.short_reason(exc)[:160]
        raise InputError(url, f"corrupt or truncated {fmt} ({reason})", FailureKind.CORRUPT) from None
    if arr.size == 0:
        raise InputError(url, "image has no pixels", FailureKind.EMPTY)
    return _layout(_check_pixels(np.asarray(arr), url), url)


def decode(data: bytes, url: str, channels: int = 1) -> np.ndarray:
    """Bytes of a PNG/JPEG/TIFF/BMP -> float32 (H, W) for gray or (H, W, 3) for colour, in [0, 1]."""
    return to_float(decode_raw(data, url), channels)


def fetch(url: str) -> bytes:
    """An image file's bytes; a missing or forbidden one is bad input (a store that stays
    unreachable is not: its StorageError goes on)."""
    try:
        return storage.read_bytes(url)
    except storage.StorageError as exc:
        if exc.transient:
            raise
        raise InputError(url, str(exc).split(": ", 1)[-1], FailureKind.UNREADABLE) from None


def peek_shape(data: bytes, url: str) -> tuple[int, int] | None:
    """Height and width from the header alone, without decoding (None where it cannot tell:
    decoding will then say what is wrong)."""
    try:
        fmt = sniff(data, url)
        if fmt == "TIFF":
            with tifffile.TiffFile(io.BytesIO(data)) as tif:
                page = tif.pages.first
                return int(page.imagelength), int(page.imagewidth)
        with Image.open(io.BytesIO(data), formats=[fmt]) as im:
            return im.size[1], im.size[0]
    except Exception:  # noqa: BLE001 - any header problem is reported by the decoder
        return None


def read_raw(url: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, int]:
    """Read and decode an image, keeping its own pixel type (see ``decode_raw``); also the bytes read."""
    data = fetch(url)
    return decode_raw(data, url, max_pixels), len(data)


def read_image(url: str, channels: int = 1, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    return to_float(read_raw(url, max_pixels)[0], channels)


def read_mask(url: str, shape: tuple[int, int], max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Ground-truth mask as bool (H, W); it must match the image size."""
    m = read_image(url, 1, max_pixels)
    if m.shape != shape:
        raise InputError(url, f"mask is {m.shape[1]}x{m.shape[0]}, image is {shape[1]}x{shape[0]}",
                         FailureKind.MASK)
    return m > 0.5


def _shape(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def scaled_shape(height: int, width: int, scale: float) -> tuple[int, int]:
    """An image's processing shape at ``scale`` (aspect ratio kept; the same for training and scan)."""
    if scale == 1:
        return height, width
    return max(1, round(height * scale)), max(1, round(width * scale))


def _source_rows(n_out: int, n_in: int, start: int, stop: int) -> tuple[np.ndarray, ...]:
    """Source samples and weights of outputs [start, stop) of a linear resize n_in -> n_out with
    pixel centres aligned and mirrored borders, as ``scipy.ndimage.zoom(grid_mode=True)`` samples."""
    pos = np.abs((np.arange(start, stop) + 0.5) * (n_in / n_out) - 0.5)
    pos = np.where(pos > n_in - 1, 2 * (n_in - 1) - pos, pos) if n_in > 1 else np.zeros_like(pos)
    lo = np.floor(pos).astype(np.int64)
    return lo, np.minimum(lo + 1, n_in - 1), (pos - lo).astype(np.float32)


def _resize_band(img: np.ndarray, size: tuple[int, int], channels: int | None,
                 rows: tuple[int, int]) -> np.ndarray:
    """Output rows [r0, r1) of ``resize_image``, from the source rows they need (plus the
    anti-aliasing filter's reach), so a band equals those rows of the whole resize."""
    (h, w), (oh, ow) = img.shape[:2], size
    fy, fx = h / oh, w / ow
    sigma = (max(0.0, (fy - 1) / 2), max(0.0, (fx - 1) / 2))
    halo = int(4.0 * sigma[0] + 0.5)              # scipy's Gaussian reaches 4 sigma
    ylo, yhi, wy = _source_rows(oh, h, *rows)
    xlo, xhi, wx = _source_rows(ow, w, 0, ow)
    a, b = max(0, int(ylo.min()) - halo), min(h, int(yhi.max()) + 1 + halo)
    src = img[a:b] if channels is None else to_float(img[a:b], channels)
    src = src.astype(np.float32, copy=False)
    if any(sigma):
        src = ndi.gaussian_filter(src, sigma + (0,) * (src.ndim - 2), mode="mirror")
    wyb, wxb = wy.reshape(-1, *[1] * (src.ndim - 1)), wx.reshape(-1, *[1] * (src.ndim - 2))
    band = src[ylo - a] * (1 - wyb) + src[yhi - a] * wyb
    return np.clip(band[:, xlo] * (1 - wxb) + band[:, xhi] * wxb, 0, 1)


def resize_rows(img: np.ndarray, size: tuple[int, int], rows: tuple[int, int],
                channels: int | None = None) -> np.ndarray:
    """Rows [r0, r1) of ``resize_image(img, size, channels)``, computed a few at a time."""
    (h, w), (r0, r1) = img.shape[:2], rows
    step = max(1, int((1 << 22) // (w * max(1.0, h / size[0]))))    # about 4 Mpx of source per step
    parts = [_resize_band(img, size, channels, (i, min(r1, i + step))) for i in range(r0, r1, step)]
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def resize_image(img: np.ndarray, size: int | tuple[int, int] | None,
                 channels: int | None = None) -> np.ndarray:
    """Resize to ``size`` (a side or (H, W)) as ``skimage.transform.resize(order=1, anti_aliasing=True)``
    does, a band of rows at a time, so memory follows the output, not the source; None keeps it.

    ``img``: float32 in [0, 1], or native pixels converted band by band with ``to_float(.., channels)``.
    """
    if size is None or (img.shape[:2] == _shape(size) and channels is None):
        return img
    return resize_rows(img, _shape(size), (0, _shape(size)[0]), channels)


class ScaledImage:
    """An image at another scale whose rows are resized when they are taken (``image[i0:i1]``), so a
    large image is held only as stored, never also at processing resolution; ``np.asarray`` gives
    the whole of it. Rows equal those of ``resize_image``."""

    dtype = np.dtype(np.float32)

    def __init__(self, raw: np.ndarray, size: tuple[int, int], channels: int):
        self.raw, self.size, self.channels = raw, size, channels
        self.shape = tuple(size) + ((3,) if channels == 3 else ())
        self.ndim = len(self.shape)

    def __getitem__(self, key):
        if isinstance(key, slice) and key.step in (None, 1):
            r0, r1, _ = key.indices(self.shape[0])
            if r1 <= r0:
                return np.empty((0,) + self.shape[1:], np.float32)
            return resize_rows(self.raw, self.size, (r0, r1), self.channels)
        return np.asarray(self)[key]

    def __array__(self, dtype=None, copy=None):
        whole = resize_rows(self.raw, self.size, (0, self.size[0]), self.channels)
        return whole if dtype is None else whole.astype(dtype)


def resize_mask(mask: np.ndarray, size: int | tuple[int, int] | None) -> np.ndarray:
    if size is None or mask.shape == _shape(size):
        return mask
    return sk_resize(mask.astype(np.float32), _shape(size), order=1, anti_aliasing=False) >= 0.5


def to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.asarray(img) * 255.0), 0, 255).astype(np.uint8)


def encode_png(arr: np.ndarray, compress_level: int = 1) -> bytes:
    """uint8 (H, W) or (H, W, 3), or a bool mask (saved as a 1-bit PNG) -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def encode_tiff(arr: np.ndarray) -> bytes:
    """Uncompressed TIFF: float16 residuals barely compress, and zlib would cost more than the SSIM."""
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr)
    return buf.getvalue()


def write_png(url: str, arr: np.ndarray) -> None:
    storage.write_bytes(url, encode_png(arr))
