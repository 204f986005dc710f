"""The per-image step: image -> averaged reconstruction -> residual -> opened residual -> mask.

A plain function of a loaded model and settings, reused by the single-process scan, calibration
and (later) the Ray actors. Images are scaled by the same factor as the training images were.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from skimage.measure import label
from torch import nn

from .artifact import ModelCard
from .config import InspectConfig, SSIMConfig
from .datasets import Sample
from .images import InputError, read_image, read_mask, resize_image, resize_mask
from .inference import Reconstructor, prepare_model, to_chw
from .segmentation import open_residual, segment


@dataclass
class ImageResult:
    """Everything the scan writes or accumulates for one image."""

    key: str
    residual: np.ndarray             # (H, W) float32 at processing resolution
    opened: np.ndarray | None        # grey opening of the residual (computed when evaluating)
    mask: np.ndarray | None          # opened > threshold (None without a threshold)
    tiles: int
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def score(self) -> float:
        return float(self.residual.max())

    def record(self) -> dict:
        out = {"key": self.key, "status": "ok", "score": self.score,
               "height": int(self.residual.shape[0]), "width": int(self.residual.shape[1]), "tiles": self.tiles,
               "timings": {k: round(v, 6) for k, v in self.timings.items()}}
        if self.opened is not None:
            out["score_opened"] = float(self.opened.max())
        if self.mask is not None:
            out["flagged_pixels"] = int(self.mask.sum())
            out["regions"] = int(label(self.mask, connectivity=2).max()) if out["flagged_pixels"] else 0
        return out


class Inspector:
    """A loaded model with its card and inspection settings; ``inspect`` runs the per-image step."""

    def __init__(self, model: nn.Module, card: ModelCard, cfg: InspectConfig = InspectConfig(),
                 threshold: float | None = None, device: str | torch.device = "cpu"):
        self.card, self.cfg = card, cfg
        self.threshold = card.threshold if threshold is None else threshold
        self.model = prepare_model(model, cfg.precision, device)
        self.reconstructor = Reconstructor(self.model, card.model, cfg)

    def load(self, sample: Sample) -> tuple[np.ndarray, np.ndarray | None]:
        """Read and downscale an image (and its ground truth, when the sample has one)."""
        img = read_image(sample.url, self.card.model.channels)
        gt = None
        if sample.defect_type == "good":
            gt = np.zeros(img.shape[:2], bool)
        elif sample.defective:
            gt = read_mask(sample.mask_url, img.shape[:2])
            if not gt.any():
                raise InputError(sample.mask_url, "mask of a defective image is empty", "mask")
        size = self.card.resize
        img = resize_image(img, size)
        if min(img.shape[:2]) <= SSIMConfig().window // 2:
            raise InputError(sample.url, f"image is {img.shape[1]}x{img.shape[0]}, too small to inspect", "size")
        return img, (None if gt is None else resize_mask(gt, size))

    def residual_map(self, image: np.ndarray, key: str = "") -> tuple[np.ndarray, int, dict[str, float]]:
        """The model's part of the step: (H, W) residual, tiles used, timings."""
        t0 = time.perf_counter()
        x = to_chw(image)
        before = self.reconstructor.tiles_processed
        recon, nll = self.reconstructor.run(x, key=_key_seed(key))
        t1 = time.perf_counter()
        residual = self.reconstructor.residual(x, recon, nll).cpu().numpy()
        t2 = time.perf_counter()
        return residual, self.reconstructor.tiles_processed - before, {"inference": t1 - t0, "residual": t2 - t1}

    def segment(self, key: str, residual: np.ndarray, tiles: int, timings: dict[str, float],
                grey: bool = True) -> ImageResult:
        """The rest of the step, without the model: opening and mask. ``grey`` also keeps the grey
        opening of the whole map (the ROC after opening needs it; a mask alone does not)."""
        t0 = time.perf_counter()
        d = self.cfg.opening_diameter
        opened = open_residual(residual, d) if grey else None
        mask = None if self.threshold is None else segment(residual, self.threshold, d, opened)
        return ImageResult(key, residual, opened, mask, tiles, {**timings, "segment": time.perf_counter() - t0})

    def inspect(self, image: np.ndarray, key: str = "") -> ImageResult:
        """Run the method on one (H, W[, C]) image in [0, 1] at processing resolution."""
        return self.segment(key, *self.residual_map(image, key))


def _key_seed(key: str) -> int:
    import zlib

    return zlib.crc32(key.encode())
