"""Residual -> anomaly score: the paper thresholds 1 - SSIM as is; two options make it fit real data.

Smoothing averages the residual over a defect-sized neighbourhood, so a crack's coherent residual
rises above the speckle a stochastic texture leaves everywhere. Position normalisation divides out
what defect-free images leave at each position (aligned parts: edges, printing, fixtures), as a
z-score against statistics learned by calibration. Both work on bands of rows exactly as on the
whole map (the band's halo covers the smoothing radius).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ray_inspect.config import Z_MAX, ScoreConfig


def smoothing_radius(sigma: float) -> int:
    """Half-width of the Gaussian kernel: 4 sigma, as scipy.ndimage truncates it."""
    return int(4.0 * sigma + 0.5) if sigma > 0 else 0


def smooth(residual: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing with mirrored borders (= scipy.ndimage.gaussian_filter, mode 'reflect')."""
    if sigma <= 0:
        return residual
    import cv2

    r = smoothing_radius(sigma)
    x = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    k = (k / k.sum()).astype(np.float32)
    src = np.ascontiguousarray(residual, dtype=np.float32)
    if min(src.shape) <= r:      # OpenCV mirrors one reflection only; pad like numpy's 'symmetric'
        pad = np.pad(src, r, mode="symmetric")
        return cv2.sepFilter2D(pad, cv2.CV_32F, k, k, borderType=cv2.BORDER_REFLECT)[r:-r, r:-r]
    return cv2.sepFilter2D(src, cv2.CV_32F, k, k, borderType=cv2.BORDER_REFLECT)


def _linear_weights(n_out: int, n_in: int, start: int, stop: int) -> tuple[np.ndarray, ...]:
    """Source indices and weights of output rows [start, stop) of a linear resize n_in -> n_out
    (pixel centres aligned, as skimage's order-1 resize)."""
    pos = (np.arange(start, stop) + 0.5) * (n_in / n_out) - 0.5
    pos = np.clip(pos, 0, n_in - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, (pos - lo).astype(np.float32)


def resample_rows(grid: np.ndarray, shape: tuple[int, int], rows: tuple[int, int]) -> np.ndarray:
    """Rows [r0, r1) of ``grid`` linearly resampled to ``shape``, without building the whole map."""
    (h, w), (r0, r1) = shape, rows
    ylo, yhi, fy = _linear_weights(h, grid.shape[0], r0, r1)
    xlo, xhi, fx = _linear_weights(w, grid.shape[1], 0, w)
    top = grid[ylo] * (1 - fy[:, None]) + grid[yhi] * fy[:, None]
    return top[:, xlo] * (1 - fx) + top[:, xhi] * fx


@dataclass(frozen=True)
class PositionStats:
    """Mean and spread of the defect-free score at each position, on a reference grid that is
    resampled to each image's processing shape."""

    mean: np.ndarray   # (h, w) float32
    std: np.ndarray    # (h, w) float32, floored (see ``fit``)

    @classmethod
    def fit(cls, maps: list[np.ndarray], floor: float = 0.1) -> PositionStats:
        """Statistics of defect-free maps, each resampled to the first map's shape; the spread is
        floored at ``floor`` times its median, so a position that never varied does not explode."""
        shape = maps[0].shape
        total = np.zeros(shape, np.float64)
        squares = np.zeros(shape, np.float64)
        for m in maps:
            m = m if m.shape == shape else resample_rows(m, shape, (0, shape[0]))
            total += m
            squares += np.square(m, dtype=np.float64)
        mean = total / len(maps)
        std = np.sqrt(np.maximum(squares / len(maps) - mean**2, 0.0))
        std = np.maximum(std, floor * max(float(np.median(std)), 1e-6))
        return cls(mean.astype(np.float32), std.astype(np.float32))

    def rows(self, shape: tuple[int, int], rows: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        if self.mean.shape == shape:
            return self.mean[rows[0] : rows[1]], self.std[rows[0] : rows[1]]
        return resample_rows(self.mean, shape, rows), resample_rows(self.std, shape, rows)


class Scorer:
    """Applies a ``ScoreConfig`` to residual rows; ``halo`` extra rows on each side make a band's
    result equal the whole map's."""

    def __init__(self, cfg: ScoreConfig = ScoreConfig(), stats: PositionStats | None = None):
        if cfg.normalise == "position" and stats is None:
            raise ValueError("position normalisation needs the statistics learned by calibrate")
        self.cfg, self.stats = cfg, stats
        self.halo = smoothing_radius(cfg.smooth_sigma)

    def __call__(self, residual: np.ndarray, rows: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
        """Score of ``residual``, which holds rows ``rows`` of an image of ``shape`` (H, W)."""
        score = smooth(residual, self.cfg.smooth_sigma)
        if self.cfg.normalise == "position":
            mean, std = self.stats.rows(shape, rows)
            score = np.clip((score - mean) / std, 0.0, Z_MAX).astype(np.float32)
        return score

    def score_range(self, residual_range: tuple[float, float]) -> tuple[float, float]:
        return (0.0, Z_MAX) if self.cfg.normalise == "position" else residual_range
