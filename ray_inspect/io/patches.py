"""Training patches in Zarr v3: (N, C, 128, 128) uint8, chunked along N, local or s3://.

``prepare`` scales the defect-free training images by one factor (aspect ratio kept, the factor
recorded for the scan) and crops N random windows, one chunk at a time; the array is marked
complete (with a content fingerprint) only after its last chunk.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import OrderedDict
from typing import Callable

import numpy as np
import zarr

from ray_inspect.config import InspectConfig, PrepareConfig
from ray_inspect.io import storage
from ray_inspect.io.datasets import train_images
from ray_inspect.io.images import (
    decode_raw,
    fetch,
    peek_shape,
    read_image,
    resize_image,
    scaled_shape,
    to_uint8,
)

SIZE_SAMPLE = 256   # training images whose headers decide the scale


def choose_scale(urls: list[str], cfg: PrepareConfig, seed: int = 0) -> tuple[float, int]:
    """The factor for every image: ``cfg.scale``, or the one that takes the smallest shorter side of
    (a sample of) the training images to ``cfg.short_side`` (so every image still holds a patch),
    never enlarging; also that smallest side."""
    rng = np.random.default_rng(seed)
    pick = urls
    if len(urls) > SIZE_SAMPLE:
        pick = [urls[i] for i in rng.choice(len(urls), SIZE_SAMPLE, replace=False)]
    sides = []
    for url in pick:
        data = fetch(url)
        shape = peek_shape(data, url) or decode_raw(data, url).shape[:2]   # a header it cannot read: decode
        sides.append(min(shape[:2]))
    smallest = int(min(sides))
    if cfg.scale is not None:
        return float(cfg.scale), smallest
    if cfg.short_side is None:
        return 1.0, smallest
    return min(1.0, cfg.short_side / smallest), smallest


def scale_reason(attrs: dict, cfg: PrepareConfig) -> str:
    """One line for the user: the factor, why, and the smallest defect that survives the opening."""
    scale, side = attrs["scale"], attrs["min_short_side"]
    if cfg.scale is not None:
        why = f"--scale {cfg.scale:g}"
    elif cfg.short_side is None:
        why = "--short-side none keeps the original resolution"
    elif scale == 1:
        why = f"the images' shorter side ({side} px) is already at most {cfg.short_side} px"
    else:
        why = f"shorter side {side} px -> {cfg.short_side} px"
    smallest = math.ceil(InspectConfig().opening_diameter / scale)
    return (f"scale {scale:.4g} ({why}); a defect narrower than about {smallest} px at full resolution "
            f"is removed by the {InspectConfig().opening_diameter}-px opening")


class _ImageCache:
    """Decoded, scaled training images as uint8, bounded by a byte budget (LRU)."""

    def __init__(self, urls: list[str], cfg: PrepareConfig, scale: float, budget: int):
        self.urls, self.cfg, self.scale, self.budget = urls, cfg, scale, budget
        self.items: OrderedDict[int, np.ndarray] = OrderedDict()
        self.size = 0

    def get(self, i: int) -> np.ndarray:
        if i in self.items:
            self.items.move_to_end(i)
            return self.items[i]
        img = read_image(self.urls[i], self.cfg.channels)
        shape = scaled_shape(img.shape[0], img.shape[1], self.scale)
        img = to_uint8(img if shape == img.shape[:2] else resize_image(img, shape))
        img = img[None] if img.ndim == 2 else np.moveaxis(img, -1, 0)
        p = self.cfg.patch
        if img.shape[1] < p or img.shape[2] < p:
            raise ValueError(f"{self.urls[i]}: image is {img.shape[2]}x{img.shape[1]} after scaling by "
                             f"{self.scale:.4g}, smaller than a {p}-px patch (use a larger --short-side)")
        self.items[i] = img
        self.size += img.nbytes
        while self.size > self.budget and len(self.items) > 1:
            _, old = self.items.popitem(last=False)
            self.size -= old.nbytes
        return img


def _store(url: str):
    return storage.local_path(url) if storage.is_local(url) else url


def is_patch_store(url: str) -> bool:
    """Whether ``url`` holds a Zarr array that ``prepare`` wrote (finished or not)."""
    try:
        meta = json.loads(storage.read_text(storage.join(url, "zarr.json")))
    except (storage.StorageError, FileNotFoundError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("node_type") == "array" \
        and "complete" in (meta.get("attributes") or {})


def check_output(dataset: str, out: str) -> None:
    """``prepare`` replaces ``out`` only when it is a patch store that ``prepare`` made (or nothing,
    or an empty folder), and never when it holds the data set or lies inside it."""
    if storage.contains(out, dataset) or storage.contains(dataset, out):
        raise ValueError(f"{out}: the patch store must lie outside the data set {dataset} (and not hold it)")
    if storage.exists(out) and not is_patch_store(out) and storage.find(out):
        raise ValueError(f"{out}: exists and is not a patch store made by prepare; nothing was removed "
                         "(choose another path, or remove it yourself)")


def prepare(dataset: str, out: str, cfg: PrepareConfig = PrepareConfig(),
            progress: Callable[[int], None] | None = None, cache_bytes: int = 1 << 30) -> dict:
    """Crop ``cfg.patches`` random patches from the training images of ``dataset`` into ``out``."""
    urls = train_images(dataset)
    check_output(dataset, out)
    scale, smallest = choose_scale(urls, cfg, cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    n, p, c = cfg.patches, cfg.patch, cfg.channels
    which = rng.integers(0, len(urls), size=n)
    where = rng.random((n, 2))
    cache = _ImageCache(urls, cfg, scale, cache_bytes)
    if storage.exists(out):
        storage.remove(out, recursive=True)
    arr = zarr.create_array(store=_store(out), shape=(n, c, p, p), chunks=(cfg.chunk, c, p, p), dtype="uint8",
                            storage_options=storage.storage_options(out) or None, overwrite=True,
                            attributes={"complete": False})
    digest = hashlib.sha256()
    for start in range(0, n, cfg.chunk):
        stop = min(n, start + cfg.chunk)
        block = np.empty((stop - start, c, p, p), np.uint8)
        for j, i in enumerate(range(start, stop)):
            img = cache.get(int(which[i]))
            y = int(where[i, 0] * (img.shape[1] - p + 1))
            x = int(where[i, 1] * (img.shape[2] - p + 1))
            block[j] = img[:, y : y + p, x : x + p]
        write_rows(arr, start, block)
        digest.update(block.tobytes())
        if progress:
            progress(stop - start)
    attrs = {"complete": True, "source": dataset, "scale": scale, "short_side": cfg.short_side,
             "min_short_side": smallest, "seed": cfg.seed, "patches": n, "channels": c, "patch": p,
             "images": len(urls), "fingerprint": digest.hexdigest()[:16]}
    arr.attrs.update(attrs)
    return attrs


@storage.retrying
def read_rows(array: zarr.Array, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a patch array, retried like every other storage request."""
    return array[start:stop]


@storage.retrying
def write_rows(array: zarr.Array, start: int, block: np.ndarray) -> None:
    """Write ``block`` at row ``start`` (whole chunks: a retry rewrites the same bytes)."""
    array[start : start + len(block)] = block


def open_patches(url: str) -> zarr.Array:
    """Open a prepared patch array read-only; refuses one whose preparation did not finish."""
    try:
        arr = zarr.open_array(store=_store(url), mode="r",
                              storage_options=storage.storage_options(url) or None)
    except (FileNotFoundError, KeyError, ValueError) as exc:
        raise storage.StorageError(f"{url}: not a patch array ({exc.__class__.__name__})") from None
    if not arr.attrs.get("complete"):
        raise storage.StorageError(f"{url}: patch array is incomplete (preparation did not finish)")
    if arr.ndim != 4 or arr.shape[2:] != (128, 128):
        raise storage.StorageError(f"{url}: expected (N, C, 128, 128) patches, found {arr.shape}")
    return arr
