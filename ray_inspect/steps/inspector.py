"""The per-image step: image -> averaged reconstruction -> residual -> opened residual -> mask.

A plain function of a loaded model and settings, used by calibration, the scan actors and
notebooks. Images are scaled by the factor the training images were scaled by. An image with more
than ``InspectConfig.region_pixels`` pixels is processed in horizontal bands on the global window
grid, so memory stays bounded and the result is exactly that of the whole image.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
from skimage.measure import label
from torch import nn

from ray_inspect.config import InspectConfig, SSIMConfig
from ray_inspect.core.inference import Reconstructor, prepare_model, to_chw
from ray_inspect.core.scoring import Scorer, Stats, image_contrast
from ray_inspect.core.segmentation import open_residual, segment
from ray_inspect.core.tiling import Band, plan_bands
from ray_inspect.io.artifact import ModelCard
from ray_inspect.io.datasets import Sample
from ray_inspect.io.images import (
    ScaledImage,
    check_pixels,
    decode_raw,
    read_mask,
    read_raw,
    resize_image,
    resize_mask,
    to_float,
)
from ray_inspect.records import FailureKind, InputError


@dataclass
class BandResult:
    """Rows [start, stop) of an image's maps."""

    rows: tuple[int, int]
    residual: np.ndarray             # (n, W) float32: the score map (the residual unless the card
                                     # smooths or normalises it)
    opened: np.ndarray | None        # grey opening of the residual (when evaluating)
    mask: np.ndarray | None          # opened > threshold (None without a threshold)
    tiles: int
    timings: dict[str, float]


@dataclass
class ImageResult:
    """One image's whole maps (for calibration, notebooks and tests)."""

    key: str
    residual: np.ndarray             # (H, W) float32 at processing resolution
    opened: np.ndarray | None
    mask: np.ndarray | None
    tiles: int
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def score(self) -> float:
        return float(self.residual.max())

    def record(self) -> dict:
        out = {"key": self.key, "status": "ok", "score": self.score,
               "height": int(self.residual.shape[0]), "width": int(self.residual.shape[1]),
               "tiles": self.tiles, "timings": {k: round(v, 6) for k, v in self.timings.items()}}
        if self.opened is not None:
            out["score_opened"] = float(self.opened.max())
        if self.mask is not None:
            out["flagged_pixels"] = int(self.mask.sum())
            out["regions"] = int(label(self.mask, connectivity=2).max()) if out["flagged_pixels"] else 0
        return out


@dataclass
class LoadedImage:
    """An image at processing resolution in its own pixel type, its ground truth, bytes read and
    the (H, W) it has as stored (masks are written at that size)."""

    pixels: np.ndarray
    gt: np.ndarray | None
    nbytes: int
    source_shape: tuple[int, int]


class Inspector:
    """A loaded model with its card and inspection settings; ``bands`` runs the per-image step.

    ``stats``: the position or feature statistics of a card that normalises (``load_model`` reads
    them as ``model.normaliser``)."""

    def __init__(self, model: nn.Module, card: ModelCard, cfg: InspectConfig = InspectConfig(),  # noqa: PLR0913 - model, its card and statistics, settings, threshold, device
                 threshold: float | None = None, device: str | torch.device = "cpu",
                 stats: Stats | None = None):
        self.card, self.cfg = card, cfg
        self.threshold = card.threshold if threshold is None else threshold
        self.model = prepare_model(model, cfg.precision, device)
        self.reconstructor = Reconstructor(self.model, card.model, cfg)
        self.scorer = Scorer(card.score, stats)

    def read(self, sample: Sample, data: bytes | None = None) -> LoadedImage:
        """Read an image (from ``data`` when its bytes are at hand) and its ground truth, and scale
        it like the training images."""
        limit = self.cfg.max_pixels
        raw, nbytes = read_raw(sample.url, limit) if data is None else (decode_raw(data, sample.url, limit),
                                                                        len(data))
        gt = None
        if sample.defect_type == "good":
            gt = np.zeros(raw.shape[:2], bool)
        elif sample.defective:
            gt = read_mask(sample.mask_url, raw.shape[:2], limit)
            if not gt.any():
                raise InputError(sample.mask_url, "mask of a defective image is empty", FailureKind.MASK)
        source_shape = tuple(raw.shape[:2])
        shape = self.card.processing_shape(*source_shape)
        if shape != source_shape:
            check_pixels(*shape, sample.url, limit, "at the model's processing size")
            channels = self.card.model.channels     # a large image is resized band by band as it is used
            raw = ScaledImage(raw, shape, channels) if self.is_large(*source_shape) else \
                resize_image(raw, shape, channels)
            gt = None if gt is None else resize_mask(gt, shape)
        if min(raw.shape[:2]) <= SSIMConfig().window // 2:
            raise InputError(sample.url, f"image is {raw.shape[1]}x{raw.shape[0]}, too small to inspect",
                             FailureKind.SIZE)
        return LoadedImage(raw, gt, nbytes, source_shape)

    def load(self, sample: Sample) -> tuple[np.ndarray, np.ndarray | None]:
        """The image as float32 in [0, 1] at processing resolution, and its ground truth."""
        img = self.read(sample)
        return to_float(img.pixels, self.card.model.channels), img.gt

    def is_large(self, height: int, width: int) -> bool:
        """Whether an image of this size (as stored) is decoded or processed beyond one region."""
        h, w = self.card.processing_shape(height, width)
        return max(height * width, h * w) > self.cfg.region_pixels

    def band_rows(self, height: int, width: int) -> int:
        """Output rows per band: all of them unless the image exceeds ``region_pixels``."""
        if height * width <= self.cfg.region_pixels or min(height, width) < self.card.model.patch:
            return height
        return max(1, self.cfg.region_pixels // width)

    def bands(self, pixels: np.ndarray, key: str = "", keep_opened: bool = True) -> Iterator[BandResult]:
        """The step, a band of rows at a time (one band unless the image exceeds region_pixels).

        ``keep_opened`` also keeps the grey opening of the maps (the ROC after opening needs it; a
        mask alone does not). ``pixels`` may be in the image's own type: bands are converted as used.
        """
        h, w = pixels.shape[:2]
        channels, seed = self.card.model.channels, _key_seed(key)
        rec = self.reconstructor
        band_rows = self.band_rows(h, w)
        if band_rows == h:
            t0 = time.perf_counter()
            x = to_chw(to_float(pixels, channels))
            recon, nll = rec.run(x, key=seed)
            grid = rec.grid(max(h, rec.patch), max(w, rec.patch))      # of the image padded to a window
            yield self._finish(Band.whole(grid, h), x, recon, nll, keep_opened, len(grid), t0)
            return
        grid = rec.grid(h, w)
        d = self.cfg.opening_diameter
        margin = d + self.scorer.halo
        contrast = self._contrast(pixels) if self.scorer.needs_contrast else None
        for band in plan_bands(grid, h, band_rows, margin, SSIMConfig().window // 2, self.cfg.batch_size):
            t0 = time.perf_counter()
            i0, i1 = band.input_rows
            x = to_chw(to_float(pixels[i0:i1], channels))
            recon, nll = rec.run_band(x, grid, band, key=seed)
            c0, c1 = band.recon_rows
            tiles = (band.grid_rows[1] - band.grid_rows[0]) * len(grid.xs)
            yield self._finish(band, x[:, c0 - i0 : c1 - i0], recon, nll, keep_opened, tiles, t0, contrast)

    def _contrast(self, pixels: np.ndarray) -> np.ndarray:
        """The whole image's contrast for a banded scan, read a block of rows at a time."""
        channels = self.card.model.channels
        h, w = pixels.shape[:2]
        return image_contrast(lambda a, b: _grey(to_chw(to_float(pixels[a:b], channels))), h, w)

    def _finish(self, band: Band, x: torch.Tensor, recon: torch.Tensor, nll: torch.Tensor | None,  # noqa: PLR0913 - one band's tensors and bookkeeping
                keep_opened: bool, tiles: int, t0: float, contrast: np.ndarray | None = None) -> BandResult:
        """Residual of the band's reconstructed rows (``x`` and ``recon`` hold ``band.recon_rows``),
        its score, then the opening and the mask of its output rows."""
        t1 = time.perf_counter()
        residual = self.reconstructor.residual(x, recon, nll).cpu().numpy()
        (r0, r1), c0 = band.residual_rows, band.recon_rows[0]
        image = _grey(x[:, r0 - c0 : r1 - c0]) if self.scorer.needs_image else None
        shape = (band.image_rows, residual.shape[-1])
        residual = self.scorer(residual[r0 - c0 : r1 - c0], (r0, r1), shape, image, contrast)
        t2 = time.perf_counter()
        d = self.cfg.opening_diameter
        opened = open_residual(residual, d) if keep_opened else None
        mask = None if self.threshold is None else segment(residual, self.threshold, d, opened)
        keep = slice(band.rows[0] - r0, band.rows[1] - r0)
        timings = {"inference": t1 - t0, "residual": t2 - t1, "segment": time.perf_counter() - t2}
        return BandResult(band.rows, residual[keep], None if opened is None else opened[keep],
                          None if mask is None else mask[keep], tiles, timings)

    def inspect(self, image: np.ndarray, key: str = "", keep_opened: bool = True) -> ImageResult:
        """Run the method on one (H, W[, C]) image at processing resolution; whole maps back."""
        parts = list(self.bands(image, key, keep_opened))
        timings: dict[str, float] = {}
        for p in parts:
            for k, v in p.timings.items():
                timings[k] = timings.get(k, 0.0) + v

        def cat(name):
            arrays = [getattr(p, name) for p in parts]
            return None if arrays[0] is None else np.concatenate(arrays)

        tiles = sum(p.tiles for p in parts)
        return ImageResult(key, cat("residual"), cat("opened"), cat("mask"), tiles, timings)


def _grey(x: torch.Tensor) -> np.ndarray:
    """(C, H, W) -> the (H, W) grey image the feature normalisation sees: the channels' mean."""
    return x.mean(dim=0).cpu().numpy()


def _key_seed(key: str) -> int:
    import zlib

    return zlib.crc32(key.encode("utf-8", "surrogateescape"))   # a non-UTF-8 local name as its bytes
