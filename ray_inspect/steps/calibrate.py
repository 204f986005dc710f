"""Threshold selection on defect-free validation images only (never on the test defects).

Calibration also fixes how the residual becomes the score (``ScoreConfig``): the paper's residual
as is, or smoothed and/or normalised by position or feature statistics learned here, from the same
images.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import Callable

import numpy as np

from ray_inspect.config import InspectConfig, ScoreConfig
from ray_inspect.core.scoring import (
    FeaturePositionStats,
    FeatureStats,
    PositionStats,
    Scorer,
    Stats,
    contrast_of,
)
from ray_inspect.core.segmentation import open_residual, threshold_for_fpr, threshold_for_min_area
from ray_inspect.io.artifact import load_model, save_normaliser, score_range, write_card
from ray_inspect.io.datasets import Sample, defect_free
from ray_inspect.records import InputError
from ray_inspect.steps.inspector import Inspector


def calibrate(model_url: str, images: str, min_area: int | None = None, fpr: float | None = None,  # noqa: PLR0913 - the rule, the score and the settings are the call's meaning
              cfg: InspectConfig = InspectConfig(), progress: Callable[[str], None] | None = None,
              write: bool = True, score: ScoreConfig = ScoreConfig()) -> dict:
    """Set the model card's score and threshold, by MVTec AD's minimum-area rule or a target pixel FPR."""
    if (min_area is None) == (fpr is None):
        raise ValueError("give exactly one of --min-area or --fpr")
    model = load_model(model_url)
    features = score.normalise.startswith("features")   # learned from the raw residual, smoothed after
    first = ScoreConfig() if features else replace(score, normalise="none")
    card = replace(model.card, score=first, normaliser="", normaliser_sha256="")
    inspector = Inspector(model, card, cfg, threshold=None)
    urls = defect_free(images)
    if not urls:
        raise FileNotFoundError(f"{images}: no defect-free validation images found")
    maps, greys, errors = [], [], []
    for url in urls:
        try:
            img, _ = inspector.load(Sample(url, url))
        except InputError as exc:
            errors.append(str(exc))
            continue
        maps.append(inspector.inspect(img, url, keep_opened=score.normalise == "none"))
        if features:
            greys.append(img.mean(axis=-1) if img.ndim == 3 else img)
        if progress:
            progress(url)
    if not maps:
        raise ValueError(f"{images}: none of the validation images could be read")
    if score.normalise == "none":
        stats, opened = None, [m.opened for m in maps]
    else:
        stats, scores = _fit(score, [m.residual for m in maps], greys)
        opened = [open_residual(s, cfg.opening_diameter) for s in scores]
    if min_area is not None:
        t = threshold_for_min_area(opened, min_area)
        rule = {"rule": "min_area", "min_area": min_area}
    else:
        t = threshold_for_fpr(opened, fpr)  # the FPR of the masks the scan will write (opened > t)
        rule = {"rule": "fpr", "fpr": fpr}
    rule.update({"images": len(opened), "source": images, "stride": cfg.stride, "precision": cfg.precision})
    card = replace(card, score=score, threshold=t, threshold_rule=rule,
                   score_range=Scorer(score, stats).score_range(score_range(card.model.loss)))
    if write:
        if stats is not None:
            name, sha = save_normaliser(model_url, stats)
            card = replace(card, normaliser=name, normaliser_sha256=sha)
        write_card(model_url, card)
    return {"threshold": t, **rule, "errors": errors,
            "score": asdict(score)}


def _fit(score: ScoreConfig, residuals: list[np.ndarray], greys: list[np.ndarray]) -> tuple[Stats, list]:
    """The statistics ``score`` needs, learned from the validation maps (smoothed residuals for
    position normalisation, raw ones for features), and each map's score as the scan computes it.
    Features+position learns its position statistics from the feature scores, then z-scores them."""
    if score.normalise == "position":
        stats = PositionStats.fit(residuals)
        return stats, _apply(Scorer(ScoreConfig(0.0, "position"), stats), residuals)
    contrasts = [contrast_of(g) for g in greys] if score.adapt_contrast else None   # measured once
    features = FeatureStats.fit(greys, residuals, score.adapt_contrast, contrasts)
    distances = _apply(Scorer(ScoreConfig(score.smooth_sigma, "features", score.adapt_contrast), features),
                       residuals, greys, contrasts)
    if score.normalise == "features":
        return features, distances
    position = PositionStats.fit(distances)
    return FeaturePositionStats(features, position), _apply(Scorer(ScoreConfig(0.0, "position"), position),
                                                            distances)


def _apply(scorer: Scorer, maps: list[np.ndarray], greys: list[np.ndarray] | None = None,
           contrasts: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """``scorer`` over whole maps (with their grey images and contrasts where it needs them)."""
    greys = greys if greys is not None else [None] * len(maps)
    contrasts = contrasts if contrasts is not None else [None] * len(maps)
    return [scorer(m, (0, m.shape[0]), m.shape, g, c) for m, g, c in zip(maps, greys, contrasts, strict=True)]
