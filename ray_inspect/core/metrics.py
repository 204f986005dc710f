"""Pixel ROC, AU-PRO and image AUROC from fixed-bin histograms that add up across shards.

Scores are binned on a fixed grid (``bins`` over ``range``; values outside go to the end bins), so
statistics computed on any split of a data set sum to those of the whole. A pixel counts as
defect at threshold edge_b when its bin is >= b; ties inside one bin count half in the AUROC.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
from scipy.stats import rankdata
from skimage.measure import label

DEFAULT_BINS = 65_536


def _bin_index(scores: np.ndarray, lo: float, hi: float, bins: int) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64).ravel()
    idx = np.floor((s - lo) * (bins / (hi - lo)))
    return np.clip(np.nan_to_num(idx, nan=0.0), 0, bins - 1).astype(np.int64)


def _partial_auc(fpr: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Area under y(fpr) for fpr in [0, limit] (trapezoids, interpolated at the limit)."""
    if limit >= fpr[-1]:
        return float(np.trapezoid(y, fpr))
    k = int(np.searchsorted(fpr, limit, side="right"))
    y_at = np.interp(limit, fpr[k - 1 : k + 1], y[k - 1 : k + 1])
    return float(np.trapezoid(np.append(y[:k], y_at), np.append(fpr[:k], limit)))


@dataclass
class PixelROC:
    """Mergeable pixel-level ROC: histograms of good and defect pixel scores (+ per-region PRO mass).

    ``pro`` holds, per bin, the sum over ground-truth regions of (region pixels in the bin /
    region size); with ``regions`` it gives the per-region overlap curve without keeping regions.
    """

    bins: int = DEFAULT_BINS
    range: tuple[float, float] = (0.0, 1.0)
    good: np.ndarray = field(default=None, repr=False)
    defect: np.ndarray = field(default=None, repr=False)
    pro: np.ndarray = field(default=None, repr=False)
    regions: int = 0

    def __post_init__(self) -> None:
        self.range = (float(self.range[0]), float(self.range[1]))
        if not self.range[1] > self.range[0]:
            raise ValueError("ROC range must have hi > lo")
        if self.good is None:
            self.good = np.zeros(self.bins, np.int64)
            self.defect = np.zeros(self.bins, np.int64)
            self.pro = np.zeros(self.bins, np.float64)

    def update(self, scores: np.ndarray, mask: np.ndarray | None = None, regions: bool = True,
               labels: np.ndarray | None = None, sizes: np.ndarray | None = None) -> "PixelROC":
        """Add one map's pixels; ``mask`` True marks defect pixels (None: all good).

        For a band of a larger map, pass the band's rows of the whole mask's region ``labels``
        and the regions' whole ``sizes``; the caller then counts the regions once.
        """
        idx = _bin_index(scores, *self.range, self.bins)
        if mask is None:
            self.good += np.bincount(idx, minlength=self.bins)
            return self
        m = np.asarray(mask, dtype=bool)
        if m.shape != np.shape(scores):
            raise ValueError(f"mask shape {m.shape} != score shape {np.shape(scores)}")
        flat = m.ravel()
        both = np.bincount(idx * 2 + flat, minlength=2 * self.bins).reshape(self.bins, 2)
        self.good += both[:, 0]
        self.defect += both[:, 1]
        if regions and flat.any():
            if labels is None:
                labels = label(m, connectivity=2)
                sizes = np.bincount(labels.ravel())
                self.regions += len(sizes) - 1
            lab = labels.ravel()
            sel = lab > 0
            self.pro += np.bincount(idx[sel], weights=1.0 / sizes[lab[sel]], minlength=self.bins)
        return self

    def __add__(self, other: "PixelROC") -> "PixelROC":
        if (self.bins, self.range) != (other.bins, other.range):
            raise ValueError("cannot merge ROC statistics with different bins")
        return PixelROC(self.bins, self.range, self.good + other.good, self.defect + other.defect,
                        self.pro + other.pro, self.regions + other.regions)

    def _suffix(self, h: np.ndarray) -> np.ndarray:
        """Counts at or above each bin edge, from the highest threshold down, with a leading 0."""
        return np.concatenate([[0], np.cumsum(h[::-1])])

    def curve(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(fpr, tpr, thresholds), fpr ascending; thresholds are bin lower edges (+inf first)."""
        g, d = self.good.sum(), self.defect.sum()
        if g == 0 or d == 0:
            raise ValueError("ROC needs both good and defect pixels")
        edges = np.linspace(*self.range, self.bins + 1)[:-1]
        thr = np.concatenate([[np.inf], edges[::-1]])
        return self._suffix(self.good) / g, self._suffix(self.defect) / d, thr

    def auroc(self) -> float:
        fpr, tpr, _ = self.curve()
        return float(np.trapezoid(tpr, fpr))

    def pro_curve(self) -> tuple[np.ndarray, np.ndarray]:
        """(fpr, mean per-region overlap), fpr ascending."""
        if self.regions == 0 or self.good.sum() == 0:
            raise ValueError("PRO needs defect regions and good pixels")
        fpr = self._suffix(self.good) / self.good.sum()
        return fpr, self._suffix(self.pro) / self.regions

    def au_pro(self, fpr_limit: float = 0.3) -> float:
        fpr, pro = self.pro_curve()
        return _partial_auc(fpr, pro, fpr_limit) / fpr_limit

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez_compressed(buf, good=self.good, defect=self.defect, pro=self.pro,
                            meta=np.array([self.bins, self.regions], np.int64),
                            range=np.array(self.range, np.float64))
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "PixelROC":
        z = np.load(io.BytesIO(data))
        bins, regions = (int(v) for v in z["meta"])
        return cls(bins, tuple(z["range"]), z["good"], z["defect"], z["pro"], regions)


def au_pro(scores: list[np.ndarray], masks: list[np.ndarray], fpr_limit: float = 0.3,
           bins: int = DEFAULT_BINS, range: tuple[float, float] | None = None) -> float:
    """AU-PRO (MVTec AD) over lists of maps: 8-connected regions pooled over the set, up to fpr_limit."""
    if range is None:
        lo = min(float(np.min(s)) for s in scores)
        hi = max(float(np.max(s)) for s in scores)
        range = (lo, hi if hi > lo else lo + 1.0)
    roc = PixelROC(bins, range)
    for s, m in zip(scores, masks, strict=True):
        roc.update(s, m)
    return roc.au_pro(fpr_limit)


def image_auroc(scores: list[float], labels: list[bool]) -> float:
    """Image-level AUROC (Mann-Whitney U, ties counted half) of per-image scores."""
    s = np.asarray(scores, np.float64)
    y = np.asarray(labels, bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("image AUROC needs both good and defective images")
    ranks = rankdata(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
