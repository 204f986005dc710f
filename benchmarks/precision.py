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
from ray_inspect.core.inference import prepare_model
from ray_inspect.core.metrics import PixelROC
from ray_inspect.io.datasets import list_samples
from ray_inspect.steps.inspector import Inspector


def main(model_url: str, dataset: str, limit: int = 30) -> None:
    model = load_model(model_url)
    samples = [s for s in list_samples(dataset) if s.labelled][:limit]
    res = {}
    maps = {}
    variants = {"float32": ("float32", True), "bfloat16": ("bfloat16", True),
                "bfloat16_autocast": ("bfloat16", False)}        # the unfused forward, for comparison
    for name, (prec, fuse) in variants.items():
        insp = Inspector(model, model.card, InspectConfig(precision=prec), stats=model.normaliser)
        insp.reconstructor.model = prepare_model(model, prec, fuse=fuse)
        roc = PixelROC(range=model.card.score_range)
        t0 = time.perf_counter()
        out = []
        for s in samples:
            img, gt = insp.load(s)
            r = insp.inspect(img, s.key, keep_opened=False).residual
            roc.update(r, gt, regions=False)
            out.append(r)
        res[name] = {"pixel_auroc": roc.auroc(), "seconds": time.perf_counter() - t0}
        maps[name] = out
    for name in ("bfloat16", "bfloat16_autocast"):
        pairs = zip(maps["float32"], maps[name], strict=True)
        diff = np.concatenate([np.abs(a - b).ravel() for a, b in pairs])
        res[name].update(residual_abs_diff={"max": float(diff.max()), "mean": float(diff.mean()),
                                            "p99": float(np.quantile(diff, 0.99))},
                         auroc_change=res[name]["pixel_auroc"] - res["float32"]["pixel_auroc"],
                         speedup=res["float32"]["seconds"] / res[name]["seconds"])
    res["images"] = len(samples)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:3])
