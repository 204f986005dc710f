"""Decode and encode images: 8/16-bit PNG, TIFF (integer or float), JPEG -> float32 in [0, 1]."""

from __future__ import annotations

import io
import os

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError
from skimage.color import rgb2gray
from skimage.transform import resize as sk_resize

from ray_inspect.io import storage
from ray_inspect.records import FailureKind, InputError

IMAGE_EXTENSIONS = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
# Line-scan and wafer images exceed Pillow's default bomb guard (179 Mpx); keep a guard, higher.
Image.MAX_IMAGE_PIXELS = int(os.environ.get("RAY_INSPECT_MAX_IMAGE_PIXELS", 1 << 30))


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
    if arr.dtype == np.uint8:
        out = arr.astype(np.float32) / 255.0
    elif arr.dtype == np.uint16:
        out = arr.astype(np.float32) / 65535.0
    else:
        out = arr.astype(np.float32)
    if out.ndim == 2:
        return out if channels == 1 else np.repeat(out[..., None], 3, axis=-1)
    return rgb2gray(out).astype(np.float32) if channels == 1 else out


def decode_raw(data: bytes, url: str) -> np.ndarray:
    """Bytes of a PNG/TIFF/JPEG -> validated pixels in their own type (uint8, uint16, bool or
    float32), (H, W) or (H, W, 3). A large image stays compact until ``to_float`` on a band."""
    if not data:
        raise InputError(url, "empty file (0 bytes)", FailureKind.EMPTY)
    ext = os.path.splitext(url.lower())[1]
    try:
        if ext in (".tif", ".tiff") or data[:4] in (b"II*\x00", b"MM\x00*"):
            arr = tifffile.imread(io.BytesIO(data))
        else:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                if im.mode in ("P", "PA", "LA", "CMYK", "YCbCr", "HSV", "LAB", "1"):
                    im = im.convert("RGB" if im.mode not in ("LA", "1") else "L")
                if im.mode == "I;16" or im.mode.startswith("I;16"):
                    arr = np.array(im, dtype=np.uint16)
                elif im.mode in ("I", "F"):
                    raise InputError(url, f"unsupported PNG/JPEG mode {im.mode}", FailureKind.MODE)
                else:
                    arr = np.asarray(im)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure (bombs, unsupported TIFFs) is bad input
        reason = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        if isinstance(exc, UnidentifiedImageError):
            reason = "not an image (cannot identify format)"
        raise InputError(url, f"corrupt or truncated image ({reason[:160]})", FailureKind.CORRUPT) from None
    if arr.size == 0:
        raise InputError(url, "image has no pixels", FailureKind.EMPTY)
    return _layout(_check_pixels(np.asarray(arr), url), url)


def decode(data: bytes, url: str, channels: int = 1) -> np.ndarray:
    """Bytes of a PNG/TIFF/JPEG -> float32 (H, W) for gray or (H, W, 3) for colour, in [0, 1]."""
    return to_float(decode_raw(data, url), channels)


def fetch(url: str) -> bytes:
    """An image file's bytes; an unreadable one is bad input."""
    try:
        return storage.read_bytes(url)
    except storage.StorageError as exc:
        raise InputError(url, str(exc).split(": ", 1)[-1], FailureKind.UNREADABLE) from None


def peek_shape(data: bytes, url: str) -> tuple[int, int] | None:
    """Height and width from the header alone, without decoding (None where it cannot tell:
    decoding will then say what is wrong)."""
    try:
        ext = os.path.splitext(url.lower())[1]
        if ext in (".tif", ".tiff") or data[:4] in (b"II*\x00", b"MM\x00*"):
            with tifffile.TiffFile(io.BytesIO(data)) as tif:
                shape = tif.series[0].shape
            if len(shape) == 3 and shape[0] <= 4 < shape[-1]:
                shape = shape[1:]                        # planar (C, H, W), as _layout reads it
            return int(shape[0]), int(shape[1])
        with Image.open(io.BytesIO(data)) as im:
            return im.size[1], im.size[0]
    except Exception:  # noqa: BLE001 - any header problem is reported by the decoder
        return None


def read_raw(url: str) -> tuple[np.ndarray, int]:
    """Read and decode an image, keeping its own pixel type (see ``decode_raw``); also the bytes read."""
    data = fetch(url)
    return decode_raw(data, url), len(data)


def read_image(url: str, channels: int = 1) -> np.ndarray:
    return to_float(read_raw(url)[0], channels)


def read_mask(url: str, shape: tuple[int, int]) -> np.ndarray:
    """Ground-truth mask as bool (H, W); it must match the image size."""
    m = read_image(url, channels=1)
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


def resize_image(img: np.ndarray, size: int | tuple[int, int] | None) -> np.ndarray:
    """Downscale to ``size`` (a side or (H, W); anti-aliased), as the paper does for textures;
    None keeps the image as it is."""
    if size is None or img.shape[:2] == _shape(size):
        return img
    out = sk_resize(img, _shape(size) + img.shape[2:], order=1, anti_aliasing=True, preserve_range=True)
    return np.clip(out, 0, 1).astype(np.float32)


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
