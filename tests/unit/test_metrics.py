"""Pixel ROC and AU-PRO against sklearn and an exact sort-based reference; mergeability."""

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from ray_inspect import PixelROC, au_pro, image_auroc


def synthetic_maps(seed=0, n=6, shape=(120, 130)):
    rng = np.random.default_rng(seed)
    scores, masks = [], []
    for i in range(n):
        m = np.zeros(shape, bool)
        if i % 3:  # some defect-free maps
            for _ in range(rng.integers(1, 4)):
                y, x = rng.integers(0, shape[0] - 20), rng.integers(0, shape[1] - 20)
                m[y:y + rng.integers(3, 20), x:x + rng.integers(3, 20)] = True
        s = rng.gamma(2.0, 0.08, shape) + m * rng.gamma(2.0, 0.02, shape)
        scores.append(ndimage.gaussian_filter(s, 1.0))
        masks.append(m)
    return scores, masks


def exact_au_pro(scores, masks, limit=0.3):
    """MVTec AD definition, one threshold per distinct score, by sorting."""
    s = np.concatenate([x.ravel() for x in scores])
    good = ~np.concatenate([m.ravel() for m in masks])
    region_id = np.full(s.size, -1)
    sizes, off, base = [], 0, 0
    for m in masks:
        lab, n = ndimage.label(m, structure=np.ones((3, 3)))
        flat = lab.ravel()
        region_id[off:off + flat.size][flat > 0] = flat[flat > 0] - 1 + base
        sizes += list(np.bincount(flat)[1:])
        base += n
        off += flat.size
    sizes = np.array(sizes, float)
    order = np.argsort(-s, kind="stable")
    s_sorted = s[order]
    fp = np.cumsum(good[order]) / good.sum()
    weights = np.where(region_id[order] >= 0, 1.0 / sizes[np.maximum(region_id[order], 0)], 0.0)
    pro = np.cumsum(weights) / len(sizes)
    last = np.r_[s_sorted[1:] != s_sorted[:-1], True]   # threshold points: after each distinct value
    fpr = np.r_[0.0, fp[last]]
    pro = np.r_[0.0, pro[last]]
    keep = fpr <= limit
    k = keep.sum()
    x, y = fpr[:k], pro[:k]
    y_lim = np.interp(limit, fpr[k - 1:k + 1], pro[k - 1:k + 1])
    return np.trapezoid(np.r_[y, y_lim], np.r_[x, limit]) / limit


def test_auroc_matches_sklearn():
    scores, masks = synthetic_maps()
    roc = PixelROC(range=(0.0, 2.0))
    for s, m in zip(scores, masks, strict=True):
        roc.update(s, m)
    ref = roc_auc_score(np.concatenate([m.ravel() for m in masks]),
                        np.concatenate([s.ravel() for s in scores]))
    assert abs(roc.auroc() - ref) <= 1e-3
    assert 0.6 < ref < 0.99  # a non-trivial case


def test_au_pro_matches_exact_reference():
    scores, masks = synthetic_maps(1)
    got = au_pro(scores, masks, fpr_limit=0.3)
    ref = exact_au_pro(scores, masks, 0.3)
    assert abs(got - ref) <= 1e-3
    assert 0.2 < ref < 0.95


def test_merging_shards_equals_whole():
    scores, masks = synthetic_maps(2)
    whole = PixelROC(range=(0, 2))
    a, b = PixelROC(range=(0, 2)), PixelROC(range=(0, 2))
    for i, (s, m) in enumerate(zip(scores, masks, strict=True)):
        whole.update(s, m)
        (a if i % 2 else b).update(s, m)
    merged = PixelROC.from_bytes((a + b).to_bytes())
    np.testing.assert_array_equal(merged.good, whole.good)
    np.testing.assert_array_equal(merged.defect, whole.defect)
    assert merged.regions == whole.regions
    assert merged.au_pro() == pytest.approx(whole.au_pro(), abs=1e-12)
    with pytest.raises(ValueError):
        _ = a + PixelROC(bins=16)


def test_curve_ends_and_image_auroc():
    scores, masks = synthetic_maps(3)
    roc = PixelROC(range=(0, 2))
    for s, m in zip(scores, masks, strict=True):
        roc.update(s, m)
    fpr, tpr, thr = roc.curve()
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(thr[1:]) <= 0)
    img_scores = [s.max() for s in scores]
    labels = [m.any() for m in masks]
    assert image_auroc(img_scores, labels) == pytest.approx(roc_auc_score(labels, img_scores))


def test_perfect_and_inverted_scores():
    m = np.zeros((50, 50), bool)
    m[10:20, 10:20] = True
    perfect = PixelROC().update(m * 0.9 + 0.05, m)
    assert perfect.auroc() == pytest.approx(1.0) and perfect.au_pro() == pytest.approx(1.0)
    inverted = PixelROC().update((~m) * 0.9 + 0.05, m)
    assert inverted.auroc() == pytest.approx(0.0)
