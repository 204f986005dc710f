"""Residual -> score: smoothing, position and feature statistics against scipy, OpenCV and numpy."""

import cv2
import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

from ray_inspect.config import Z_MAX, InspectConfig, ModelConfig, ScoreConfig
from ray_inspect.core.model import build_model
from ray_inspect.core.scoring import (
    JET_SCALES,
    N_FEATURES,
    N_IMAGE_FEATURES,
    FeaturePositionStats,
    FeatureStats,
    PositionStats,
    Scorer,
    feature_blocks,
    image_contrast,
    image_feature_samples,
    local_features,
    resample_rows,
    smooth,
    smoothing_radius,
)
from ray_inspect.io.artifact import ModelCard
from ray_inspect.steps.inspector import Inspector


@pytest.mark.parametrize("shape,sigma", [((60, 90), 1.0), ((41, 33), 2.5), ((200, 150), 4.0), ((5, 9), 4.0)])
def test_smoothing_is_scipys_gaussian_with_mirrored_borders(shape, sigma):
    r = np.random.default_rng(0).random(shape).astype(np.float32)
    ref = ndi.gaussian_filter(r.astype(np.float64), sigma, mode="reflect", truncate=4.0)
    np.testing.assert_allclose(smooth(r, sigma), ref, atol=1e-6)
    assert smoothing_radius(sigma) == int(4 * sigma + 0.5)
    assert smooth(r, 0.0) is r                     # the paper's residual passes untouched


@pytest.mark.parametrize("src,dst,rows", [((20, 30), (47, 61), (0, 47)), ((20, 30), (47, 61), (11, 29)),
                                          ((64, 64), (13, 9), (0, 13)), ((8, 8), (8, 8), (2, 5))])
def test_resampled_rows_equal_opencvs_bilinear_resize(src, dst, rows):
    g = np.random.default_rng(1).random(src).astype(np.float32)
    ref = cv2.resize(g, (dst[1], dst[0]), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_allclose(resample_rows(g, dst, rows), ref[rows[0] : rows[1]], atol=1e-6)


def test_position_statistics_are_the_per_pixel_mean_and_floored_std():
    rng = np.random.default_rng(2)
    maps = [rng.gamma(2.0, 0.05, (30, 40)).astype(np.float32) for _ in range(12)]
    maps[0][5, 5] = maps[1][5, 5] = 0.3                       # vary one position strongly
    for m in maps[2:]:
        m[7, 9] = 0.1                                          # and keep another constant
    stats = PositionStats.fit(maps)
    stack = np.stack(maps).astype(np.float64)
    np.testing.assert_allclose(stats.mean, stack.mean(0), rtol=1e-5)
    std = stack.std(0)
    floor = 0.1 * np.median(std)
    np.testing.assert_allclose(stats.std, np.maximum(std, floor), rtol=1e-4)
    assert stats.std[7, 9] == pytest.approx(max(std[7, 9], floor), rel=1e-4)
    # maps of another size are resampled onto the first map's grid
    mixed = PositionStats.fit([maps[0], cv2.resize(maps[1], (80, 60), interpolation=cv2.INTER_LINEAR)])
    assert mixed.mean.shape == (30, 40)


def test_normalised_score_is_the_clipped_z_score():
    rng = np.random.default_rng(3)
    stats = PositionStats(rng.random((20, 30)).astype(np.float32),
                          (0.05 + rng.random((20, 30))).astype(np.float32))
    r = rng.random((20, 30)).astype(np.float32) * 3
    z = Scorer(ScoreConfig(normalise="position"), stats)(r, (0, 20), (20, 30))
    np.testing.assert_allclose(z, np.clip((r - stats.mean) / stats.std, 0, Z_MAX), rtol=1e-6)
    assert Scorer(ScoreConfig(normalise="position"), stats).score_range((0.0, 2.0)) == (0.0, Z_MAX)
    with pytest.raises(ValueError, match="statistics"):
        Scorer(ScoreConfig(normalise="position"))


def _reference_features(img: np.ndarray, residual: np.ndarray) -> np.ndarray:
    """scipy's Gaussian derivatives and numpy's symmetric eigenvalue solver, pixel by pixel."""
    out = []
    for s in JET_SCALES:
        def g(order, s=s):
            return ndi.gaussian_filter(img.astype(np.float64), s, order=order, mode="reflect", truncate=4.0)
        hyy, hxx, hxy = g((2, 0)), g((0, 2)), g((1, 1))
        hessian = np.stack([np.stack([hyy, hxy], -1), np.stack([hxy, hxx], -1)], -2)
        low, high = np.moveaxis(np.linalg.eigvalsh(hessian), -1, 0)
        out += [s * s * high, s * s * low, s * np.hypot(g((1, 0)), g((0, 1)))]
    out.append(ndi.gaussian_filter(residual.astype(np.float64), 2.0, mode="reflect", truncate=4.0))
    return np.stack(out, -1)


@pytest.mark.parametrize("shape", [(70, 90), (20, 45)])      # 20 rows: narrower than the sigma-8 kernel
def test_local_features_are_scipys_gaussian_derivatives_and_hessian_eigenvalues(shape):
    rng = np.random.default_rng(5)
    img, residual = rng.random(shape).astype(np.float32), rng.random(shape).astype(np.float32)
    f = local_features(img, residual)
    assert f.shape == (*shape, N_FEATURES) == (*shape, 13)
    np.testing.assert_allclose(f, _reference_features(img, residual), atol=1e-6)


def test_feature_statistics_are_the_pixels_mean_and_covariance_and_score_a_mahalanobis_distance():
    rng = np.random.default_rng(6)
    imgs = [ndi.gaussian_filter(rng.random((40, 50)), 1.5).astype(np.float32) for _ in range(3)]
    res = [rng.random((40, 50)).astype(np.float32) for _ in range(3)]
    stats = FeatureStats.fit(imgs, res)
    x = np.concatenate([_reference_features(i, r).reshape(-1, N_FEATURES)
                        for i, r in zip(imgs, res, strict=True)])
    np.testing.assert_allclose(stats.mean, x.mean(0), rtol=1e-5, atol=1e-7)
    cov = np.cov(x.T, bias=True)
    inv = stats.whiten.T @ stats.whiten                        # W^T W is the inverse covariance
    np.testing.assert_allclose(inv @ cov, np.eye(N_FEATURES), atol=1e-3)
    probe_img, probe_res = rng.random((30, 20)).astype(np.float32), rng.random((30, 20)).astype(np.float32)
    f = _reference_features(probe_img, probe_res)
    d = f.reshape(-1, N_FEATURES) - x.mean(0)
    naive = np.sqrt(np.einsum("ij,jk,ik->i", d, np.linalg.inv(cov), d)).reshape(30, 20)
    scored = Scorer(ScoreConfig(normalise="features"), stats)(probe_res, (0, 30), (30, 20), probe_img)
    np.testing.assert_allclose(scored, np.minimum(naive, Z_MAX), rtol=2e-3)
    assert 10 < np.median(scored) < Z_MAX                     # white noise is far from smooth images
    assert Scorer(ScoreConfig(normalise="features"), stats)(probe_res * 100, (0, 30), (30, 20),
                                                            probe_img).max() == Z_MAX
    with pytest.raises(ValueError, match="statistics"):
        Scorer(ScoreConfig(normalise="features"), PositionStats(np.ones((2, 2)), np.ones((2, 2))))
    with pytest.raises(ValueError, match="image rows"):
        Scorer(ScoreConfig(normalise="features"), stats)(probe_res, (0, 30), (30, 20))


def test_feature_score_in_blocks_of_rows_equals_the_whole_computation():
    rng = np.random.default_rng(7)
    img = ndi.gaussian_filter(rng.random((150, 70)), 1.0).astype(np.float32)
    res = rng.random((150, 70)).astype(np.float32)
    stats = FeatureStats.fit([img], [res])
    whole = stats.distance(local_features(img, res))
    for chunk in (70, 70 * 33, 70 * 149):                     # 1 row, 33 rows, all but one row
        np.testing.assert_allclose(stats.score(img, res, chunk_pixels=chunk), whole, rtol=1e-5, atol=1e-5)
    blocks = list(feature_blocks(img, res, chunk_pixels=70 * 40))
    assert [rows for rows, _ in blocks] == [(0, 40), (40, 80), (80, 120), (120, 150)]
    np.testing.assert_allclose(np.concatenate([b for _, b in blocks]), local_features(img, res), atol=1e-6)


def _reference_contrast(img: np.ndarray) -> np.ndarray:
    """1.4826 x the median absolute deviation of scipy's image features at every 4th pixel and row."""
    f = _reference_features(img, img)[2::4, 2::4, :N_IMAGE_FEATURES].reshape(-1, N_IMAGE_FEATURES)
    return 1.4826 * np.median(np.abs(f - np.median(f, axis=0)), axis=0)


@pytest.mark.parametrize("shape", [(300, 130), (18, 40)])      # 18 rows: narrower than the sigma-8 kernel
def test_image_contrast_is_the_mad_of_the_features_on_a_sparse_grid(shape):
    rng = np.random.default_rng(8)
    img = ndi.gaussian_filter(rng.random(shape), 1.2).astype(np.float32)
    ys, xs = np.array([0, 3, shape[0] - 1]), np.array([1, 7, shape[1] - 2])
    np.testing.assert_allclose(image_feature_samples(img, ys, xs),
                               _reference_features(img, img)[ys][:, xs, :N_IMAGE_FEATURES], atol=1e-6)
    expected = _reference_contrast(img)
    whole = image_contrast(lambda a, b: img[a:b], *shape)
    np.testing.assert_allclose(whole, expected, rtol=1e-4)
    read = []                                          # a block of rows at a time: at least 4 halos of 32
    blocks = image_contrast(lambda a, b: read.append((a, b)) or img[a:b], *shape, chunk_pixels=8 * shape[1])
    np.testing.assert_array_equal(blocks, whole)
    assert len(read) == len({y // 128 for y in range(2, shape[0], 4)})
    assert max(b - a for a, b in read) <= min(shape[0], 128 + 2 * 32)   # a block and the sigma-8 halo


def _textures(rng: np.random.Generator, gains: list[float]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Smooth noise images of one texture at several contrasts, and residual maps."""
    base = [ndi.gaussian_filter(rng.random((60, 70)), 1.5) for _ in gains]
    imgs = [(0.5 + g * (b - b.mean())).astype(np.float32) for g, b in zip(gains, base, strict=True)]
    return imgs, [rng.random((60, 70)).astype(np.float32) * 0.1 for _ in gains]


def test_contrast_adaptation_rescales_each_image_towards_the_median_contrast():
    rng = np.random.default_rng(9)
    imgs, res = _textures(rng, [0.5, 1.0, 2.0, 4.0])
    stats = FeatureStats.fit(imgs, res, adapt=0.5)
    contrasts = [_reference_contrast(i) for i in imgs]
    reference = np.median(contrasts, axis=0)
    np.testing.assert_allclose(stats.reference, reference, rtol=1e-4)
    factors = [np.append((c / reference) ** -0.5, 1.0) for c in contrasts]
    x = np.concatenate([_reference_features(i, r).reshape(-1, N_FEATURES) * f
                        for i, r, f in zip(imgs, res, factors, strict=True)])
    np.testing.assert_allclose(stats.mean, x.mean(0), rtol=1e-4, atol=1e-7)
    inv = stats.whiten.T @ stats.whiten
    np.testing.assert_allclose(inv @ np.cov(x.T, bias=True), np.eye(N_FEATURES), atol=1e-3)
    probe, probe_res = _textures(rng, [3.0])
    d = _reference_features(probe[0], probe_res[0]).reshape(-1, N_FEATURES)
    d = d * np.append((_reference_contrast(probe[0]) / reference) ** -0.5, 1.0) - x.mean(0)
    naive = np.sqrt(np.einsum("ij,jk,ik->i", d, inv, d)).reshape(60, 70)
    scorer = Scorer(ScoreConfig(normalise="features", adapt_contrast=0.5), stats)
    np.testing.assert_allclose(scorer(probe_res[0], (0, 60), (60, 70), probe[0]), np.minimum(naive, Z_MAX),
                               rtol=2e-3)


def test_full_adaptation_scores_an_image_alike_at_any_contrast_and_none_does_not():
    rng = np.random.default_rng(10)
    imgs, res = _textures(rng, [0.6, 1.0, 1.5])
    probe, probe_res = _textures(rng, [1.0])

    def score(adapt, gain):
        stats = FeatureStats.fit(imgs, res, adapt=adapt)
        img = (0.5 + gain * (probe[0] - 0.5)).astype(np.float32)
        return Scorer(ScoreConfig(normalise="features", adapt_contrast=adapt), stats)(
            probe_res[0], (0, 60), (60, 70), img)

    np.testing.assert_allclose(score(1.0, 3.0), score(1.0, 1.0), rtol=2e-2)   # float32 rounding, whitened
    assert np.median(score(0.0, 3.0)) > 3 * np.median(score(0.0, 1.0))
    assert np.median(score(0.5, 1.0)) < np.median(score(0.5, 3.0)) < np.median(score(0.0, 3.0))


def test_contrast_adaptation_is_refused_where_it_cannot_apply():
    rng = np.random.default_rng(11)
    imgs, res = _textures(rng, [1.0, 2.0])
    adapted, plain = FeatureStats.fit(imgs, res, adapt=0.5), FeatureStats.fit(imgs, res)
    with pytest.raises(ValueError, match=r"contrast adaptation must be in \[0, 1\]"):
        ScoreConfig(normalise="features", adapt_contrast=1.5)
    with pytest.raises(ValueError, match="works on feature normalisation"):
        ScoreConfig(normalise="position", adapt_contrast=0.5)
    with pytest.raises(ValueError, match="learned with contrast adaptation 0.5, the score asks for 0"):
        Scorer(ScoreConfig(normalise="features"), adapted)
    with pytest.raises(ValueError, match="learned with contrast adaptation 0, the score asks for 0.5"):
        Scorer(ScoreConfig(normalise="features", adapt_contrast=0.5), plain)
    scorer = Scorer(ScoreConfig(normalise="features", adapt_contrast=0.5), adapted)
    with pytest.raises(ValueError, match="band needs the whole image's contrast"):
        scorer(res[0][10:40], (10, 40), (60, 70), imgs[0][10:40])
    contrast = image_contrast(lambda a, b: imgs[0][a:b], 60, 70)        # bands: the Inspector test below
    assert scorer(res[0][10:40], (10, 40), (60, 70), imgs[0][10:40], contrast).shape == (30, 70)


@pytest.mark.parametrize("sigma,normalise,adapt", [(4.0, "none", 0), (2.0, "position", 0),
                                                   (0.0, "position", 0), (3.0, "features", 0),
                                                   (3.0, "features+position", 0), (3.0, "features", 0.5)])
def test_bands_equal_the_whole_image_with_smoothing_and_normalisation(sigma, normalise, adapt):
    rng = np.random.default_rng(4)
    h, w = 420, 333
    img = (rng.random((h, w)) * 255).astype(np.uint8)
    stats = PositionStats(rng.random((50, 40)).astype(np.float32) * 0.5,
                          0.05 + rng.random((50, 40)).astype(np.float32))
    cfg = ModelConfig()
    smooth_img = ndi.gaussian_filter(img / 255.0, 2.0).astype(np.float32)
    residual = np.abs(smooth_img - img / 255.0)
    features = FeatureStats.fit([smooth_img, smooth_img[:, ::-1] * 0.5], [residual] * 2, adapt)

    def inspector(region):
        torch.manual_seed(0)
        card = ModelCard(model=cfg, resize=None, threshold=0.5 if normalise == "none" else 1.0,
                         score=ScoreConfig(sigma, normalise, adapt))
        return Inspector(build_model(cfg), card, InspectConfig(precision="float32", region_pixels=region),
                         stats={"position": stats, "features": features,
                                "features+position": FeaturePositionStats(features, stats)}.get(normalise))

    whole = inspector(1 << 30).inspect(img, "k")
    banded_insp = inspector(30_000)
    assert len(list(banded_insp.bands(img, "k"))) > 3
    banded = banded_insp.inspect(img, "k")
    np.testing.assert_array_equal(banded.residual, whole.residual)
    np.testing.assert_array_equal(banded.mask, whole.mask)
    torch.manual_seed(0)
    plain = Inspector(build_model(cfg), ModelCard(model=cfg, resize=None), InspectConfig(precision="float32"))
    residual = plain.inspect(img, "k").residual
    expected = residual
    if sigma:
        expected = ndi.gaussian_filter(residual.astype(np.float64), sigma, mode="reflect", truncate=4.0)
    if normalise.startswith("features"):
        f = _reference_features(img / 255.0, residual).reshape(-1, N_FEATURES)
        if adapt:
            ratio = np.clip(_reference_contrast(img / 255.0) / features.reference, 0.1, 10.0)   # clipped
            f = f * np.append(ratio ** -adapt, 1.0)
        f = f - features.mean
        inv = features.whiten.T @ features.whiten
        distance = np.minimum(np.sqrt(np.einsum("ij,jk,ik->i", f, inv, f)), Z_MAX).reshape(h, w)
        expected = ndi.gaussian_filter(distance, sigma, mode="reflect", truncate=4.0)
    if normalise.endswith("position"):
        mean = cv2.resize(stats.mean, (w, h), interpolation=cv2.INTER_LINEAR)
        std = cv2.resize(stats.std, (w, h), interpolation=cv2.INTER_LINEAR)
        expected = np.clip((expected - mean) / std, 0, Z_MAX)
    np.testing.assert_allclose(whole.residual, expected, atol=2e-5)
