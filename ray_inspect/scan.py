"""Single-process scan: list a source, run the per-image step, write masks, residuals and metrics.

Output layout under OUT (local or s3://):
  masks/<key>.png           uint8 0/255 defect mask (needs a threshold)
  residuals/<key>.tiff      float16 residual map at processing resolution
  records/<key>.json        per-image record (status, score, flagged pixels, regions, timings)
  errors.jsonl              one line per bad input: {"key", "url", "reason", "kind"}
  stats/roc.npz, stats/roc_opened.npz   mergeable pixel ROC/PRO histograms (with ground truth)
  metrics.json              pixel AUROC, AU-PRO, image AUROC (with ground truth)
  manifest.json, _SUCCESS   settings and counts; _SUCCESS is written last
"""

from __future__ import annotations

import json
import posixpath
import time
from typing import Callable

import numpy as np

from . import storage
from .artifact import load_model
from .config import InspectConfig, MetricsConfig
from .datasets import Sample, list_samples
from .images import InputError, encode_png, encode_tiff
from .metrics import PixelROC, image_auroc
from .pipeline import ImageResult, Inspector

EXIT_OK, EXIT_PARTIAL = 0, 3


def output_key(key: str, ext: str) -> str:
    return posixpath.splitext(key)[0] + ext


class Evaluation:
    """Accumulates ground-truth statistics: raw and opened pixel ROC/PRO, image scores."""

    def __init__(self, score_range: tuple[float, float], cfg: MetricsConfig = MetricsConfig()):
        self.cfg = cfg
        self.raw = PixelROC(cfg.bins, score_range)
        self.opened = PixelROC(cfg.bins, score_range)
        self.image_scores: list[float] = []
        self.image_labels: list[bool] = []

    def add(self, result: ImageResult, gt: np.ndarray) -> None:
        self.raw.update(result.residual, gt)
        self.opened.update(result.opened, gt)
        self.image_scores.append(result.score)
        self.image_labels.append(bool(gt.any()))

    def metrics(self) -> dict:
        out: dict = {"images": len(self.image_scores), "defective": int(sum(self.image_labels)),
                     "fpr_limit": self.cfg.fpr_limit, "bins": self.cfg.bins}
        for name, roc in (("", self.raw), ("_opened", self.opened)):
            if roc.defect.sum() and roc.good.sum():
                out["pixel_auroc" + name] = roc.auroc()
                out["au_pro" + name] = roc.au_pro(self.cfg.fpr_limit)
        if 0 < sum(self.image_labels) < len(self.image_labels):
            out["image_auroc"] = image_auroc(self.image_scores, self.image_labels)
        return out


def write_result(out: str, result: ImageResult, record: dict) -> None:
    """Mask, residual, then the record (the record's presence means the image is complete)."""
    if result.mask is not None:
        storage.write_bytes(storage.join(out, "masks", output_key(result.key, ".png")),
                            encode_png(result.mask.astype(np.uint8) * 255))
    storage.write_bytes(storage.join(out, "residuals", output_key(result.key, ".tiff")),
                        encode_tiff(result.residual.astype(np.float16)))
    storage.write_text(storage.join(out, "records", output_key(result.key, ".json")), json.dumps(record))


def scan(model_url: str, source: str, out: str, cfg: InspectConfig = InspectConfig(),
         threshold: float | None = None, metrics_cfg: MetricsConfig = MetricsConfig(),
         progress: Callable[[str], None] | None = None, on_error: Callable[[dict], None] | None = None) -> dict:
    """Scan every image of ``source`` into ``out``; returns the summary (also in manifest.json)."""
    t_start = time.time()
    model = load_model(model_url)
    card = model.card
    inspector = Inspector(model, card, cfg, threshold)
    samples = list_samples(source)
    if not samples:
        raise FileNotFoundError(f"{source}: no images (PNG, TIFF, JPEG) found")
    evaluation = Evaluation(card.score_range, metrics_cfg) if any(s.labelled for s in samples) else None
    errors: list[dict] = []
    done = 0
    for sample in samples:
        try:
            result, gt = _process(inspector, sample)
        except InputError as exc:
            err = {"key": sample.key, "url": exc.url, "reason": exc.reason, "kind": exc.kind}
            errors.append(err)
            if on_error:
                on_error(err)
        else:
            record = {**result.record(), "url": sample.url, "defect_type": sample.defect_type,
                      "mask_url": sample.mask_url}
            write_result(out, result, record)
            if evaluation is not None and gt is not None:
                evaluation.add(result, gt)
            done += 1
        if progress:
            progress(sample.key)
    storage.write_text(storage.join(out, "errors.jsonl"), "".join(json.dumps(e) + "\n" for e in errors))
    summary = {"model": model_url, "model_fingerprint": card.fingerprint, "source": source, "out": out,
               "images": len(samples), "scanned": done, "failed": len(errors),
               "threshold": inspector.threshold, "stride": cfg.stride, "precision": cfg.precision,
               "seconds": round(time.time() - t_start, 3)}
    if evaluation is not None and evaluation.image_scores:
        storage.write_bytes(storage.join(out, "stats", "roc.npz"), evaluation.raw.to_bytes())
        storage.write_bytes(storage.join(out, "stats", "roc_opened.npz"), evaluation.opened.to_bytes())
        summary["metrics"] = evaluation.metrics()
        storage.write_text(storage.join(out, "metrics.json"), json.dumps(summary["metrics"], indent=2))
    storage.write_text(storage.join(out, "manifest.json"), json.dumps(summary, indent=2))
    storage.write_text(storage.join(out, "_SUCCESS"), "")
    summary["exit_code"] = EXIT_PARTIAL if errors else EXIT_OK
    return summary


def _process(inspector: Inspector, sample: Sample):
    t0 = time.perf_counter()
    image, gt = inspector.load(sample)
    t_read = time.perf_counter() - t0
    result = inspector.inspect(image, sample.key)
    result.timings = {"read": t_read, **result.timings}
    return result, gt
