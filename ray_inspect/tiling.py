"""The sliding-window grid: 128-px windows at a stride, the last window flush with each border."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np
import torch


def window_starts(size: int, patch: int, stride: int) -> np.ndarray:
    """Start offsets along one axis so that windows cover [0, size); the last one ends at ``size``."""
    if size <= patch:
        return np.zeros(1, dtype=np.int64)
    starts = np.arange(0, size - patch + 1, stride, dtype=np.int64)
    if starts[-1] != size - patch:
        starts = np.append(starts, size - patch)
    return starts


@dataclass(frozen=True)
class TileGrid:
    """Window positions over an image of ``height`` x ``width`` (already padded to >= patch)."""

    height: int
    width: int
    patch: int = 128
    stride: int = 30

    def __post_init__(self) -> None:
        if self.height < self.patch or self.width < self.patch:
            raise ValueError(f"grid of {self.height}x{self.width} is smaller than a {self.patch}-px window; pad first")

    @cached_property
    def ys(self) -> np.ndarray:
        return window_starts(self.height, self.patch, self.stride)

    @cached_property
    def xs(self) -> np.ndarray:
        return window_starts(self.width, self.patch, self.stride)

    @cached_property
    def positions(self) -> np.ndarray:
        """(N, 2) array of (y, x) window origins in row-major order."""
        yy, xx = np.meshgrid(self.ys, self.xs, indexing="ij")
        return np.stack([yy.ravel(), xx.ravel()], axis=1)

    def __len__(self) -> int:
        return len(self.ys) * len(self.xs)

    @cached_property
    def coverage(self) -> torch.Tensor:
        """How many windows cover each pixel: the grid is a product, so it is an outer product."""
        cy = np.zeros(self.height, dtype=np.float32)
        cx = np.zeros(self.width, dtype=np.float32)
        for y in self.ys:
            cy[y : y + self.patch] += 1
        for x in self.xs:
            cx[x : x + self.patch] += 1
        return torch.from_numpy(np.outer(cy, cx))

    def batches(self, batch_size: int):
        """Yield (start, stop) index ranges into ``positions``."""
        for start in range(0, len(self), batch_size):
            yield start, min(start + batch_size, len(self))


@lru_cache(maxsize=64)
def grid_for(height: int, width: int, patch: int, stride: int) -> TileGrid:
    """Grids are reused across images of one size (positions and coverage computed once)."""
    return TileGrid(height, width, patch, stride)


def pad_to_patch(image: torch.Tensor, patch: int) -> torch.Tensor:
    """Pad (C, H, W) on the bottom/right by symmetric reflection up to ``patch`` per side if smaller."""
    c, h, w = image.shape
    ph, pw = max(0, patch - h), max(0, patch - w)
    if ph == 0 and pw == 0:
        return image
    idx_h = torch.from_numpy(_symmetric_index(h, h + ph))
    idx_w = torch.from_numpy(_symmetric_index(w, w + pw))
    return image[:, idx_h][:, :, idx_w]


def _symmetric_index(n: int, total: int) -> np.ndarray:
    """Indices 0..n-1, n-1..0, 0..n-1 ... of length ``total`` (numpy 'symmetric' padding)."""
    period = np.concatenate([np.arange(n), np.arange(n)[::-1]])
    return np.resize(period, total)


def extract_tiles(image: torch.Tensor, positions: np.ndarray, patch: int) -> torch.Tensor:
    """Gather (B, C, patch, patch) windows at ``positions`` from a (C, H, W) tensor without a Python loop."""
    windows = image.unfold(1, patch, 1).unfold(2, patch, 1)  # (C, H-p+1, W-p+1, p, p), a view
    ys = torch.from_numpy(positions[:, 0])
    xs = torch.from_numpy(positions[:, 1])
    return windows[:, ys, xs].permute(1, 0, 2, 3)


def overlap_add(acc: torch.Tensor, tiles: torch.Tensor, positions: np.ndarray) -> None:
    """Add (B, C, p, p) tiles into the (C, H, W) accumulator at ``positions`` (in place)."""
    p = tiles.shape[-1]
    for (y, x), t in zip(positions.tolist(), tiles):
        acc[:, y : y + p, x : x + p] += t
