"""Threshold selection on defect-free validation images only (never on the test defects)."""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

from ray_inspect.config import InspectConfig
from ray_inspect.core.segmentation import threshold_for_fpr, threshold_for_min_area
from ray_inspect.io.artifact import load_model, write_card
from ray_inspect.io.datasets import Sample, defect_free
from ray_inspect.records import InputError
from ray_inspect.steps.inspector import Inspector


def calibrate(model_url: str, images: str, min_area: int | None = None, fpr: float | None = None,
              cfg: InspectConfig = InspectConfig(), progress: Callable[[str], None] | None = None,
              write: bool = True) -> dict:
    """Set the model card's threshold by MVTec AD's minimum-area rule or a target pixel FPR."""
    if (min_area is None) == (fpr is None):
        raise ValueError("give exactly one of --min-area or --fpr")
    model = load_model(model_url)
    card = model.card
    inspector = Inspector(model, card, cfg, threshold=None)
    urls = defect_free(images)
    if not urls:
        raise FileNotFoundError(f"{images}: no defect-free validation images found")
    opened, errors = [], []
    for url in urls:
        try:
            img, _ = inspector.load(Sample(url, url))
        except InputError as exc:
            errors.append(str(exc))
            continue
        res = inspector.inspect(img, url)
        opened.append(res.opened)
        if progress:
            progress(url)
    if not opened:
        raise ValueError(f"{images}: none of the validation images could be read")
    if min_area is not None:
        t = threshold_for_min_area(opened, min_area)
        rule = {"rule": "min_area", "min_area": min_area}
    else:
        t = threshold_for_fpr(opened, fpr)  # the FPR of the masks the scan will write (opened > t)
        rule = {"rule": "fpr", "fpr": fpr}
    rule.update({"images": len(opened), "source": images, "stride": cfg.stride, "precision": cfg.precision})
    if write:
        write_card(model_url, replace(card, threshold=t, threshold_rule=rule))
    return {"threshold": t, **rule, "errors": errors}
