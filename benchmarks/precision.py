"""bfloat16 vs float32 inference on a trained model: residual deviation, AUROC change, speed.

Usage: python benchmarks/precision.py MODEL DATASET
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

from ray_inspect import load_model
from ray_inspect.config import InspectConfig
from ray_inspect.datasets import list_samples
from ray_inspect.metrics import PixelROC
from ray_inspect.pipeline import Inspector


def main(model_url: str, dataset: str, limit: int = 30) -> None:
    model = load_model(model_url)
    samples = [s for s in list_samples(dataset) if s.labelled][:limit]
    res = {}
    maps = {}
    for prec in ("float32", "bfloat16"):
        insp = Inspector(model, model.card, InspectConfig(precision=prec))
        roc = PixelROC(range=model.card.score_range)
        t0 = time.perf_counter()
        out = []
        for s in samples:
            img, gt = insp.load(s)
            r, _, _ = insp.residual_map(img, s.key)
            roc.update(r, gt, regions=False)
            out.append(r)
        res[prec] = {"pixel_auroc": roc.auroc(), "seconds": time.perf_counter() - t0}
        maps[prec] = out
    diff = np.concatenate([np.abs(a - b).ravel() for a, b in zip(maps["float32"], maps["bfloat16"])])
    res["residual_abs_diff"] = {"max": float(diff.max()), "mean": float(diff.mean()), "p99": float(np.quantile(diff, 0.99))}
    res["auroc_change"] = res["bfloat16"]["pixel_auroc"] - res["float32"]["pixel_auroc"]
    res["speedup"] = res["float32"]["seconds"] / res["bfloat16"]["seconds"]
    res["images"] = len(samples)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:3])
