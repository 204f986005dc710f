"""Opening with a diameter-4 disk, threshold rules."""

import numpy as np
import pytest
from skimage.measure import label
from skimage.morphology import opening

from ray_inspect.core.segmentation import (
    circular_footprint,
    open_residual,
    segment,
    threshold_for_fpr,
    threshold_for_min_area,
)


def test_footprint_has_diameter_four():
    fp = circular_footprint(4)
    assert fp.shape == (4, 4) and fp.sum() == 12 and not fp[0, 0] and fp[1:3].all()
    assert circular_footprint(5).sum() == 21  # odd diameters: the usual digital disk of radius 2


def test_grey_opening_equals_binary_opening_at_every_threshold():
    rng = np.random.default_rng(0)
    r = rng.random((90, 110)).astype(np.float32)
    opened = open_residual(r, 4)
    for t in (0.2, 0.5, 0.7, 0.9):
        binary = opening(r > t, circular_footprint(4))
        np.testing.assert_array_equal(segment(r, t, 4, opened), binary)
        naive = naive_opening(r > t, circular_footprint(4))
        np.testing.assert_array_equal(segment(r, t, 4, opened)[4:-4, 4:-4], naive[4:-4, 4:-4])


@pytest.mark.parametrize("diameter", [2, 3, 4, 5, 6, 7])
def test_opening_equals_skimage_edges_included(diameter):
    rng = np.random.default_rng(diameter)
    fp = circular_footprint(diameter)
    for shape, dtype in (((57, 83), np.float32), ((12, 9), np.float64), ((200, 31), np.float32)):
        r = rng.random(shape).astype(dtype)
        np.testing.assert_array_equal(open_residual(r, diameter), opening(r, fp, mode="reflect"))
        for t in (0.3, 0.6):
            np.testing.assert_array_equal(segment(r, t, diameter), opening(r > t, fp))


def naive_opening(m, fp):
    """Erosion (all of the element inside) then dilation (union of placed elements), by loops."""
    h, w = m.shape
    k = fp.shape[0]
    c = k // 2
    offs = [(dy - c, dx - c) for dy in range(k) for dx in range(k) if fp[dy, dx]]
    ero = np.zeros_like(m)
    for y in range(h):
        for x in range(w):
            ero[y, x] = all(0 <= y + dy < h and 0 <= x + dx < w and m[y + dy, x + dx] for dy, dx in offs)
    out = np.zeros_like(m)
    for y, x in zip(*np.nonzero(ero), strict=True):
        for dy, dx in offs:
            if 0 <= y + dy < h and 0 <= x + dx < w:
                out[y + dy, x + dx] = True
    return out


def test_cropped_binary_path_equals_grey_path():
    rng = np.random.default_rng(5)
    for _ in range(20):
        r = rng.random((120, 100)).astype(np.float32) * 0.5
        for _ in range(6):                                         # blobs, some touching or at the border
            y, x = rng.integers(0, 115), rng.integers(0, 95)
            r[y:y + rng.integers(2, 14), x:x + rng.integers(2, 14)] += 0.6
        r[rng.integers(0, 120, 30), rng.integers(0, 100, 30)] = 0.9       # isolated pixels
        for t in (0.45, 0.7, 1.5):
            np.testing.assert_array_equal(segment(r, t, 4), segment(r, t, 4, open_residual(r, 4)))


def test_opening_removes_thin_regions_and_keeps_disks():
    r = np.zeros((40, 40), np.float32)
    r[5:8, 5:30] = 1.0           # 3 px wide: narrower than the element, removed
    r[20:24, 20:24] = 1.0        # a 4x4 block contains the element, survives (corners may go)
    m = segment(r, 0.5, 4)
    assert not m[5:8].any()
    assert m[21:23, 20:24].all() and m.sum() >= 12


def test_fpr_rule():
    rng = np.random.default_rng(1)
    maps = [rng.random((50, 60)) for _ in range(3)]
    for fpr in (0.0, 0.01, 0.05):
        t = threshold_for_fpr(maps, fpr)
        rate = np.mean(np.concatenate([m.ravel() for m in maps]) > t)
        assert rate <= fpr
        # one step lower would exceed the target
        vals = np.sort(np.concatenate([m.ravel() for m in maps]))
        lower = vals[np.searchsorted(vals, t) - 1]
        assert np.mean(vals > lower) > fpr or fpr == 0 and lower == vals[-2]


def test_min_area_rule_is_the_smallest_threshold():
    rng = np.random.default_rng(2)
    maps = [open_residual(rng.gamma(2, 0.1, (60, 60)).astype(np.float32)) for _ in range(3)]
    area = 30
    t = threshold_for_min_area(maps, area)

    def largest(thr):
        return max((np.bincount(label(m > thr, connectivity=2).ravel())[1:].max(initial=0) for m in maps))

    assert largest(t) < area
    vals = np.unique(np.concatenate([m.ravel() for m in maps]))
    below = vals[np.searchsorted(vals, t) - 1]
    assert largest(below) >= area
    with pytest.raises(ValueError):
        threshold_for_min_area(maps, 0)


def test_region_counter_matches_labelling_the_whole_mask():
    from skimage.measure import label

    from ray_inspect.core.segmentation import RegionCounter

    rng = np.random.default_rng(0)
    for trial in range(300):
        m = rng.random((rng.integers(5, 60), rng.integers(3, 40))) < rng.uniform(0.05, 0.6)
        counter, step = RegionCounter(), int(rng.integers(1, 8))
        for s in range(0, len(m), step):
            counter.add(m[s : s + step])
        assert counter.count == label(m, connectivity=2).max(), trial


@pytest.mark.parametrize("shape,source", [((40, 64), (81, 131)), ((50, 50), (50, 50)), ((30, 20), (61, 39))])
def test_masks_upscale_band_by_band_as_skimage_nearest_resizes_the_whole(shape, source):
    from skimage.transform import resize

    from ray_inspect.core.segmentation import upscale_mask_rows

    mask = np.random.default_rng(5).random(shape) > 0.7
    ref = resize(mask, source, order=0, anti_aliasing=False, preserve_range=True) > 0
    bands = [(0, 7), (7, 8), (8, 23), (23, shape[0])]
    out = np.concatenate([upscale_mask_rows(mask[a:b], (a, b), shape, source) for a, b in bands])
    np.testing.assert_array_equal(out, ref)
