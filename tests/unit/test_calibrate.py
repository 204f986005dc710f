"""Calibration: the threshold of the score the scan will compute, position and feature statistics
learned from defect-free images only, and its errors."""

import os

import numpy as np
import pytest
import torch

from ray_inspect.config import InspectConfig, ModelConfig, ScoreConfig
from ray_inspect.core.model import build_model
from ray_inspect.core.scoring import (
    N_FEATURES,
    FeaturePositionStats,
    FeatureStats,
    image_contrast,
    local_features,
)
from ray_inspect.io.artifact import ModelCard, load_model, save_model
from ray_inspect.io.datasets import defect_free
from ray_inspect.io.images import read_image
from ray_inspect.steps.calibrate import calibrate
from ray_inspect.steps.inspector import Inspector

FAST = InspectConfig(precision="float32", stride=60)


@pytest.fixture()
def model_url(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig()
    url = str(tmp_path / "model")
    save_model(url, build_model(cfg), ModelCard(model=cfg, resize=None, scale=1.0))
    return url


def _maps(url, images, score=None, stats=None, card=None):
    model = load_model(url)
    card = card or model.card
    if score is not None:
        card = card.__class__(**{**card.__dict__, "score": score})
    insp = Inspector(model, card, FAST, stats=stats)
    return [insp.inspect(read_image(u), u) for u in defect_free(images)]


def test_position_normalisation_is_learned_from_the_validation_images(dataset, model_url):
    res = calibrate(model_url, dataset, fpr=0.05, cfg=FAST, score=ScoreConfig(2.0, "position"))
    model = load_model(model_url)
    card, stats = model.card, model.normaliser
    assert card.score == ScoreConfig(2.0, "position") and card.score_range == (0.0, 64.0)
    assert res["images"] == 4 and card.threshold == res["threshold"]
    smoothed = [m.residual for m in _maps(model_url, dataset, ScoreConfig(2.0, "none"))]
    np.testing.assert_allclose(stats.mean, np.mean(smoothed, axis=0), rtol=1e-4, atol=1e-6)
    # the scan's masks (opened score > t) flag at most 5 % of the validation pixels, and not far less
    opened = np.concatenate([m.opened.ravel() for m in _maps(model_url, dataset, stats=stats)])
    assert 0.04 <= (opened > card.threshold).mean() <= 0.05


def test_feature_normalisation_is_learned_from_the_validation_images_raw_residual(dataset, model_url):
    res = calibrate(model_url, dataset, fpr=0.05, cfg=FAST, score=ScoreConfig(3.0, "features"))
    model = load_model(model_url)
    card, stats = model.card, model.normaliser
    assert card.score == ScoreConfig(3.0, "features") and card.score_range == (0.0, 64.0)
    assert isinstance(stats, FeatureStats) and res["images"] == 4
    raw = _maps(model_url, dataset, ScoreConfig())
    greys = [read_image(u) for u in defect_free(dataset)]       # float32 in [0, 1]
    feats = np.concatenate([local_features(g, m.residual).reshape(-1, N_FEATURES)
                            for g, m in zip(greys, raw, strict=True)])
    np.testing.assert_allclose(stats.mean, feats.mean(0, dtype=np.float64), rtol=1e-4, atol=1e-7)
    opened = np.concatenate([m.opened.ravel() for m in _maps(model_url, dataset, stats=stats)])
    assert 0.04 <= (opened > card.threshold).mean() <= 0.05


def test_contrast_adaptation_is_learned_with_the_feature_statistics(dataset, model_url):
    score = ScoreConfig(3.0, "features", adapt_contrast=0.5)
    res = calibrate(model_url, dataset, fpr=0.05, cfg=FAST, score=score)
    model = load_model(model_url)
    card, stats = model.card, model.normaliser
    assert card.score == score and res["score"]["adapt_contrast"] == 0.5 and stats.adapt == 0.5
    raw = _maps(model_url, dataset, ScoreConfig())
    greys = [read_image(u) for u in defect_free(dataset)]
    contrasts = [image_contrast(lambda a, b, g=g: g[a:b], *g.shape) for g in greys]
    np.testing.assert_allclose(stats.reference, np.median(contrasts, axis=0), rtol=1e-6)
    feats = np.concatenate([local_features(g, m.residual).reshape(-1, N_FEATURES)
                            * np.append((c / stats.reference) ** -0.5, 1.0)
                            for g, m, c in zip(greys, raw, contrasts, strict=True)])
    np.testing.assert_allclose(stats.mean, feats.mean(0, dtype=np.float64), rtol=1e-4, atol=1e-7)
    opened = np.concatenate([m.opened.ravel() for m in _maps(model_url, dataset, stats=stats)])
    assert 0.04 <= (opened > card.threshold).mean() <= 0.05


def test_features_then_position_learns_the_position_statistics_of_the_feature_score(dataset, model_url):
    calibrate(model_url, dataset, fpr=0.05, cfg=FAST, score=ScoreConfig(3.0, "features"))
    features = load_model(model_url).normaliser
    distances = [m.residual for m in _maps(model_url, dataset, stats=features)]   # the smoothed distance
    calibrate(model_url, dataset, fpr=0.05, cfg=FAST, score=ScoreConfig(3.0, "features+position"))
    model = load_model(model_url)
    card, stats = model.card, model.normaliser
    assert isinstance(stats, FeaturePositionStats) and card.score_range == (0.0, 64.0)
    np.testing.assert_array_equal(stats.features.whiten, features.whiten)
    np.testing.assert_allclose(stats.position.mean, np.mean(distances, axis=0), rtol=1e-4, atol=1e-5)
    opened = np.concatenate([m.opened.ravel() for m in _maps(model_url, dataset, stats=stats)])
    assert 0.04 <= (opened > card.threshold).mean() <= 0.05

def test_paper_score_after_an_option_resets_the_card(dataset, model_url):
    calibrate(model_url, dataset, fpr=0.05, cfg=FAST, score=ScoreConfig(4.0, "position"))
    calibrate(model_url, dataset, fpr=0.05, cfg=FAST)
    card = load_model(model_url).card
    assert card.score == ScoreConfig() and card.score_range == (0.0, 2.0) and not card.normaliser
    opened = np.concatenate([m.opened.ravel() for m in _maps(model_url, dataset)])
    assert 0.04 <= (opened > card.threshold).mean() <= 0.05


def test_calibration_errors_name_the_problem(dataset, model_url, tmp_path):
    with pytest.raises(ValueError, match="exactly one"):
        calibrate(model_url, dataset, cfg=FAST)
    with pytest.raises(ValueError, match="exactly one"):
        calibrate(model_url, dataset, min_area=10, fpr=0.1, cfg=FAST)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no defect-free"):
        calibrate(model_url, str(empty), fpr=0.1, cfg=FAST)
    broken = tmp_path / "broken"
    broken.mkdir()
    for i in range(2):
        (broken / f"{i}.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="none of the validation images"):
        calibrate(model_url, str(broken), fpr=0.1, cfg=FAST)
    assert not os.path.exists(os.path.join(model_url, "normaliser"))
