"""Ground-truth statistics of a scan: pixel ROC/PRO before and after the opening, image scores.

An ``Evaluation`` of one image, of a shard or of a whole scan is the same object: they add up
exactly, so per-image statistics written by the actors merge into shard files and metrics.json
in any order, and a resumed scan gets the same numbers as an uninterrupted one.
"""

from __future__ import annotations

import io

import numpy as np

from ray_inspect.config import MetricsConfig
from ray_inspect.core.metrics import PixelROC, image_auroc


class Evaluation:
    """Raw and opened pixel ROC/PRO histograms plus (score, defective) per image."""

    def __init__(self, score_range: tuple[float, float], cfg: MetricsConfig = MetricsConfig()):
        self.cfg = cfg
        self.raw = PixelROC(cfg.bins, score_range)
        self.opened = PixelROC(cfg.bins, score_range)
        self.scores: list[float] = []
        self.labels: list[bool] = []

    def add_rows(self, residual: np.ndarray, opened: np.ndarray, gt: np.ndarray,
                 labels: np.ndarray, sizes: np.ndarray) -> None:
        """One band of an image: its rows of the maps, of the ground truth and of its region labels."""
        self.raw.update(residual, gt, labels=labels, sizes=sizes)
        self.opened.update(opened, gt, labels=labels, sizes=sizes)

    def add_image(self, score: float, defective: bool, regions: int) -> None:
        """Close an image: its score, its label (from the sample: a tiny defect may vanish from a
        downscaled mask) and its number of ground-truth regions."""
        self.scores.append(float(score))
        self.labels.append(bool(defective))
        self.raw.regions += regions
        self.opened.regions += regions

    def __iadd__(self, other: "Evaluation") -> "Evaluation":
        self.raw = self.raw + other.raw
        self.opened = self.opened + other.opened
        self.scores += other.scores
        self.labels += other.labels
        return self

    @property
    def images(self) -> int:
        return len(self.scores)

    def metrics(self) -> dict:
        out: dict = {"images": self.images, "defective": int(sum(self.labels)),
                     "fpr_limit": self.cfg.fpr_limit, "bins": self.cfg.bins}
        for name, roc in (("", self.raw), ("_opened", self.opened)):
            if roc.defect.sum() and roc.good.sum():
                out["pixel_auroc" + name] = roc.auroc()
                out["au_pro" + name] = roc.au_pro(self.cfg.fpr_limit)
        if 0 < sum(self.labels) < len(self.labels):
            out["image_auroc"] = image_auroc(self.scores, self.labels)
        return out

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        rocs = (("raw", self.raw), ("opened", self.opened))
        arrays = {f"{name}_{part}": getattr(roc, part)
                  for name, roc in rocs for part in ("good", "defect", "pro")}
        np.savez_compressed(buf, **arrays, scores=np.array(self.scores, np.float64),
                            labels=np.array(self.labels, bool), range=np.array(self.raw.range, np.float64),
                            meta=np.array([self.cfg.bins, self.raw.regions], np.int64),
                            fpr_limit=np.array(self.cfg.fpr_limit))
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "Evaluation":
        z = np.load(io.BytesIO(data))
        bins, regions = (int(v) for v in z["meta"])
        ev = cls(tuple(z["range"]), MetricsConfig(bins=bins, fpr_limit=float(z["fpr_limit"])))
        for name, roc in (("raw", ev.raw), ("opened", ev.opened)):
            roc.good, roc.defect, roc.pro = z[f"{name}_good"], z[f"{name}_defect"], z[f"{name}_pro"]
            roc.regions = regions
        ev.scores, ev.labels = z["scores"].tolist(), z["labels"].tolist()
        return ev
