"""Residual map -> defect mask: threshold, then an opening with a circular element of diameter 4.

Grey-level opening with a flat element commutes with thresholding, so ``open(r) > t`` equals the
binary opening of ``r > t`` at every threshold: one grey opening per image serves the mask, the
ROC after opening and the calibration.
"""

from __future__ import annotations

import numpy as np
from skimage.measure import label


def circular_footprint(diameter: int) -> np.ndarray:
    """Boolean disk whose *diameter* is ``diameter`` px (skimage's disk(r) is 2r+1 wide).

    Pixel centres within diameter/2 of the element's centre; diameter 4 gives the 4x4 square
    without its corners (12 px).
    """
    if diameter < 1:
        raise ValueError("opening diameter must be >= 1")
    c = (diameter - 1) / 2.0
    yy, xx = np.mgrid[:diameter, :diameter]
    return (yy - c) ** 2 + (xx - c) ** 2 <= (diameter / 2.0) ** 2


def _open(image: np.ndarray, diameter: int) -> np.ndarray:
    """Opening with OpenCV's vectorised erosion and dilation (quicker than skimage's on a float
    map). The anchors and the mirrored borders reproduce ``skimage.morphology.opening(image,
    circular_footprint(diameter), mode='reflect')`` exactly, edges included (tested)."""
    import cv2

    k = circular_footprint(diameter).astype(np.uint8)
    a, b = (diameter - 1) // 2, diameter // 2
    eroded = cv2.erode(image, k, anchor=(a, a), borderType=cv2.BORDER_REFLECT)
    return cv2.dilate(eroded, k, anchor=(b, b), borderType=cv2.BORDER_REFLECT)


def open_residual(residual: np.ndarray, diameter: int = 4) -> np.ndarray:
    """Grey-level opening (erosion, then dilation with the reflected element) of an (H, W) map."""
    if diameter <= 1:
        return residual
    return _open(np.ascontiguousarray(residual), diameter)


def segment(residual: np.ndarray, threshold: float, diameter: int = 4,
            opened: np.ndarray | None = None) -> np.ndarray:
    """Binary defect mask: the opening of ``residual > threshold`` (= opened residual > threshold)."""
    if opened is not None:
        return opened > threshold
    cand = residual > threshold
    if diameter <= 1 or not cand.any():
        return cand
    return _open(cand.view(np.uint8), diameter).view(bool)


def nearest_source(n_source: int, n: int) -> np.ndarray:
    """For each of ``n_source`` pixels along an axis, the index of the nearest of ``n`` pixels
    covering the same extent (pixel centres aligned)."""
    return np.minimum(n - 1, ((np.arange(n_source) + 0.5) * (n / n_source)).astype(np.int64))


def upscale_mask_rows(mask: np.ndarray, rows: tuple[int, int], shape: tuple[int, int],
                      source_shape: tuple[int, int]) -> np.ndarray:
    """Rows ``rows`` of a mask at processing ``shape``, as the rows of the image at ``source_shape``
    that take their value from them (nearest neighbour): consecutive bands give the whole mask."""
    if shape == source_shape:
        return mask
    src_rows = nearest_source(source_shape[0], shape[0])
    mine = src_rows[(src_rows >= rows[0]) & (src_rows < rows[1])] - rows[0]
    return mask[mine][:, nearest_source(source_shape[1], shape[1])]


def threshold_for_fpr(maps: list[np.ndarray], fpr: float) -> float:
    """Smallest threshold whose pixel false-positive rate (r > t) on defect-free maps is <= fpr."""
    if not 0 <= fpr < 1:
        raise ValueError("fpr must be in [0, 1)")
    values = np.sort(np.concatenate([np.ravel(m) for m in maps]))
    n = values.size
    allowed = int(np.floor(fpr * n))
    return float(values[n - allowed - 1])


def _largest_region(masks: list[np.ndarray]) -> int:
    best = 0
    for m in masks:
        if m.any():
            lab = label(m, connectivity=2)
            best = max(best, int(np.bincount(lab.ravel())[1:].max()))
    return best


def threshold_for_min_area(opened_maps: list[np.ndarray], min_area: int) -> float:
    """MVTec AD's rule: the smallest threshold at which no 8-connected region of the (opened)
    segmentation of the defect-free validation images reaches ``min_area`` pixels.

    The largest region shrinks monotonically as the threshold rises, so bisect over the sorted
    distinct map values (exact, about log2(pixels) labellings).
    """
    if min_area < 1:
        raise ValueError("min-area must be >= 1 pixel")
    cand = np.unique(np.concatenate([np.ravel(m) for m in opened_maps]))
    lo, hi = 0, len(cand) - 1  # the largest value always qualifies (nothing is above it)
    while lo < hi:
        mid = (lo + hi) // 2
        if _largest_region([m > cand[mid] for m in opened_maps]) < min_area:
            hi = mid
        else:
            lo = mid + 1
    return float(cand[lo])


class RegionCounter:
    """Counts the 8-connected regions of a mask fed as consecutive bands of rows, without ever
    labelling the whole mask (a 16k x 16k label image alone would take 2 GiB)."""

    def __init__(self) -> None:
        self.count = 0
        self._next = 1
        self._parent: dict[int, int] = {}
        self._last: np.ndarray | None = None   # global labels of the previous band's last row

    def _find(self, a: int) -> int:
        root = a
        while self._parent.get(root, root) != root:
            root = self._parent[root]
        while a != root:
            self._parent[a], a = root, self._parent.get(a, a)
        return root

    def add(self, mask: np.ndarray) -> None:
        if not mask.any():
            self._last = np.zeros(mask.shape[1], np.int64) if len(mask) else self._last
            return
        import cv2

        n, lab = cv2.connectedComponents(np.ascontiguousarray(mask).view(np.uint8), connectivity=8,
                                         ltype=cv2.CV_32S)
        n -= 1                                                            # label 0 is the background
        lab = np.where(lab > 0, lab + (self._next - 1), 0)
        self._next += n
        self.count += n
        if self._last is not None and n:
            prev, first, w = self._last, lab[0], lab.shape[1]
            for dx in (-1, 0, 1):   # 8-connectivity across the seam
                a = prev[max(0, -dx) : w - max(0, dx)]
                b = first[max(0, dx) : w - max(0, -dx)]
                both = (a > 0) & (b > 0)
                for x, y in set(zip(a[both].tolist(), b[both].tolist(), strict=True)):
                    rx, ry = self._find(x), self._find(y)
                    if rx != ry:
                        self._parent[ry] = rx
                        self.count -= 1
        self._last = lab[-1] if len(lab) else self._last
