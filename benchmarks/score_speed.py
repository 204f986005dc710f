"""Per-image time of the scan's step with the score options on, as ratios to the paper's score.

One process, one model, the same images: the per-image step (``Inspector.inspect``: windows,
reconstruction, residual, score, opening, mask) runs with the paper's score, with smoothing
(sigma 4), with smoothing and position normalisation, with smoothing (sigma 3) and feature
normalisation, and with that and contrast adaptation 0.5. Rounds rotate the order so that drift
cancels; each round gives a ratio to the paper's time and the median is reported. Prints JSON;
docs/benchmarks.md records it.

Usage: python benchmarks/score_speed.py [--size 256 640] [--images 8] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import date

import numpy as np
import torch

from ray_inspect.config import InspectConfig, ModelConfig, ScoreConfig
from ray_inspect.core.model import build_model
from ray_inspect.core.scoring import FeatureStats, PositionStats
from ray_inspect.io.artifact import ModelCard
from ray_inspect.steps.inspector import Inspector

VARIANTS = {"paper": ScoreConfig(), "smoothing": ScoreConfig(4.0),
            "smoothing+position": ScoreConfig(4.0, "position"),
            "smoothing+features": ScoreConfig(3.0, "features"),
            "smoothing+features+contrast": ScoreConfig(3.0, "features", adapt_contrast=0.5)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, nargs=2, default=[256, 640], help="processing shape H W")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--precision", default="bfloat16")
    a = ap.parse_args()
    torch.manual_seed(0)
    cfg = ModelConfig()
    model = build_model(cfg)
    rng = np.random.default_rng(0)
    h, w = a.size
    images = [(rng.random((h, w)) * 255).astype(np.uint8) for _ in range(a.images)]
    stats = PositionStats(rng.random((h, w)).astype(np.float32) * 0.3,
                          0.05 + rng.random((h, w)).astype(np.float32))
    grey = [i.astype(np.float32) / 255 for i in images[:2]]
    residuals = [np.abs(g - 0.5) for g in grey]
    fitted = {0.0: FeatureStats.fit(grey, residuals), 0.5: FeatureStats.fit(grey, residuals, adapt=0.5)}

    def stats_for(score: ScoreConfig):
        if score.normalise == "position":
            return stats
        return fitted[score.adapt_contrast] if score.normalise == "features" else None

    inspectors = {name: Inspector(model, ModelCard(model=cfg, resize=None, threshold=1.0, score=score),
                                  InspectConfig(precision=a.precision), stats=stats_for(score))
                  for name, score in VARIANTS.items()}
    for insp in inspectors.values():                     # warm-up: grids, kernels, allocator
        insp.inspect(images[0], "warm")
    times: dict[str, list[float]] = {k: [] for k in VARIANTS}
    names = list(VARIANTS)
    for r in range(a.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            for i, img in enumerate(images):
                inspectors[name].inspect(img, f"img{i}")
            times[name].append((time.perf_counter() - t0) / len(images))
    ratios = {k: round(statistics.median(t / p for t, p in zip(times[k], times["paper"], strict=True)), 4)
              for k in VARIANTS}
    print(json.dumps({"shape": [h, w], "images": a.images, "rounds": a.rounds, "precision": a.precision,
                      "seconds_per_image": {k: round(statistics.median(v), 4) for k, v in times.items()},
                      "ratio_to_paper": ratios, "date": date.today().isoformat(),
                      "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
                      "torch_threads": torch.get_num_threads()}, indent=2))


if __name__ == "__main__":
    main()
