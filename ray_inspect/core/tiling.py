"""The sliding-window grid: 128-px windows at a stride, the last window flush with each border.

A large image is processed in horizontal bands of whole rows: each band runs the windows that
reach its rows (plus the margins the SSIM and the opening need) on the global grid, in the same
batches as the whole image, so that the banded result is bit-for-bit the whole-image one.
"""

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
            raise ValueError(f"grid of {self.height}x{self.width} is smaller than a {self.patch}-px window; "
                             "pad first")

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
    def _cover_1d(self) -> tuple[np.ndarray, np.ndarray]:
        cy = np.zeros(self.height, dtype=np.float32)
        cx = np.zeros(self.width, dtype=np.float32)
        for y in self.ys:
            cy[y : y + self.patch] += 1
        for x in self.xs:
            cx[x : x + self.patch] += 1
        return cy, cx

    def coverage_rows(self, start: int, stop: int) -> torch.Tensor:
        """How many windows cover each pixel of rows [start, stop): the grid is a product, so
        coverage is an outer product (never materialised for the whole of a large image)."""
        cy, cx = self._cover_1d
        return torch.from_numpy(np.outer(cy[start:stop], cx))

    @cached_property
    def coverage(self) -> torch.Tensor:
        return self.coverage_rows(0, self.height)

    def rows_per_group(self, batch_size: int) -> int:
        """Grid rows per batch group: whole rows when a row fits in a batch, else one row."""
        return max(1, batch_size // len(self.xs))

    def batches(self, batch_size: int, grid_rows: tuple[int, int] | None = None):
        """Yield (start, stop) index ranges into ``positions`` over grid rows [r0, r1).

        Batches never straddle a group of ``rows_per_group`` rows, so any band aligned to groups
        sees the same batches as the whole image (float32 kernels round differently for another
        batch composition; bfloat16 ones happen not to).
        """
        nx, ny = len(self.xs), len(self.ys)
        r0, r1 = grid_rows or (0, ny)
        k = self.rows_per_group(batch_size)
        for g in range(r0, r1, k):
            lo, hi = g * nx, min(g + k, r1) * nx
            for start in range(lo, hi, batch_size):
                yield start, min(start + batch_size, hi)


@dataclass(frozen=True)
class Band:
    """A horizontal band of an image: the rows it outputs and the rows each stage needs for them."""

    rows: tuple[int, int]            # output rows (residual, mask) of this band
    residual_rows: tuple[int, int]   # residual computed here: rows +- the opening's margin
    recon_rows: tuple[int, int]      # reconstruction needed: residual rows +- the SSIM radius
    grid_rows: tuple[int, int]       # window rows reaching the reconstruction rows, group-aligned
    input_rows: tuple[int, int]      # image rows those windows read
    image_rows: int = 0              # rows of the whole image

    @classmethod
    def whole(cls, grid: TileGrid, height: int) -> Band:
        """The one band of an image of ``height`` rows: every row, every window row of ``grid``."""
        return cls((0, height), (0, height), (0, height), (0, len(grid.ys)), (0, grid.height), height)


def plan_bands(grid: TileGrid, height: int, band_rows: int, margin: int, radius: int,
               batch_size: int) -> list[Band]:
    """Cut rows [0, height) into bands of ``band_rows`` output rows on ``grid``'s windows.

    ``margin`` rows on each side feed the opening (and any smoothing of the residual), ``radius``
    more the SSIM window; the windows
    are those reaching the reconstruction rows, widened to whole batch groups.
    """
    ys, p = grid.ys, grid.patch
    k, ny = grid.rows_per_group(batch_size), len(ys)
    bands = []
    for o0 in range(0, height, band_rows):
        o1 = min(height, o0 + band_rows)
        r0, r1 = max(0, o0 - margin), min(height, o1 + margin)
        c0, c1 = max(0, r0 - radius), min(height, r1 + radius)
        j0 = int(np.searchsorted(ys + p, c0, side="right"))
        j1 = int(np.searchsorted(ys, c1, side="left"))
        j0, j1 = j0 // k * k, min(ny, -(-j1 // k) * k)
        bands.append(Band((o0, o1), (r0, r1), (c0, c1), (j0, j1), (int(ys[j0]), int(ys[j1 - 1]) + p), height))
    return bands


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


def _runs(positions: np.ndarray) -> list[tuple[int, int, int, int, int]]:
    """Split windows (in batch order) into runs along a row at a constant x step:
    (first index, count, y, x of the first, step). Images of one size repeat their batches."""
    key = positions.tobytes()
    runs = _RUNS.get(key)
    if runs is None:
        if len(_RUNS) >= 4096:
            _RUNS.clear()
        runs = _RUNS[key] = _find_runs(np.asarray(positions, dtype=np.int64))
    return runs


_RUNS: dict[bytes, list[tuple[int, int, int, int, int]]] = {}


def _find_runs(positions: np.ndarray) -> list[tuple[int, int, int, int, int]]:
    ys, xs = positions[:, 0], positions[:, 1]
    n = len(positions)
    # a run breaks where the row changes or the step does
    dx = np.diff(xs)
    brk = np.ones(n, bool)
    brk[1:] = ys[1:] != ys[:-1]
    brk[2:] |= (dx[1:] != dx[:-1]) & ~brk[1:-1]
    runs, i = [], 0
    for j in [*np.flatnonzero(brk[1:]) + 1, n]:
        runs.append((i, j - i, int(ys[i]), int(xs[i]), int(xs[i + 1] - xs[i]) if j - i > 1 else 0))
        i = j
    return runs


def _run_view(t: torch.Tensor, count: int, y: int, x: int, step: int, patch: int) -> torch.Tensor:
    """(count, C, patch, patch) view of the windows of a run in a (C, H, W) tensor."""
    sc, sh, sw = t.stride()
    return t.as_strided((count, t.shape[0], patch, patch), (step * sw, sc, sh, sw),
                        t.storage_offset() + y * sh + x * sw)


def extract_tiles(image: torch.Tensor, positions: np.ndarray, patch: int) -> torch.Tensor:
    """Gather (B, C, patch, patch) windows at ``positions`` from a (C, H, W) tensor: one copy per
    run of windows along a row."""
    out = torch.empty((len(positions), image.shape[0], patch, patch), dtype=image.dtype, device=image.device)
    for i, n, y, x, step in _runs(positions):
        out[i : i + n] = _run_view(image, n, y, x, step, patch)
    return out


def overlap_add(acc: torch.Tensor, tiles: torch.Tensor, positions: np.ndarray) -> None:
    """Add (B, C, p, p) tiles into the (C, H, W) accumulator at ``positions`` (in place).

    Along a run at step s, every ceil(p/s)-th window is clear of the others, so each such class
    is one strided in-place add (5 per row at the paper's stride, not 31). Each pixel's sum order
    depends only on the batch's windows, so bands that share the whole image's batches add up alike.
    """
    p = tiles.shape[-1]
    for i, n, y, x, step in _runs(positions):
        m = -(-p // step) if 0 < step < p else 1
        for c in range(min(m, n)):
            k = len(range(c, n, m))
            _run_view(acc, k, y, x + c * step, step * m, p).add_(tiles[i + c : i + n : m])
