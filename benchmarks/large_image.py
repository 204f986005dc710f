"""Peak actor memory and rate for very large images (default two of 16,384 x 16,384, 8-bit gray),
at native resolution or, with --scale, through a resizing model.

The image is a procedural plain weave tiled to size with a few defects, written as a PNG (and
copied, so that the actor is offered two large images at once); a He-initialised SSIM-AE (no
resize, so images are scanned at native resolution) scans them on one default actor (1 CPU: one
image computing, one more reading or writing) with the default ``region_pixels``. A record's
``max_rss_bytes`` is the actor process's peak resident memory so far. Prints a JSON object for
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from datetime import date

import numpy as np
import torch
from PIL import Image

from ray_inspect.config import InspectConfig, ModelConfig, ScanOptions, SynthConfig
from ray_inspect.core.model import ConvAE
from ray_inspect.distributed.scan import scan
from ray_inspect.io.artifact import ModelCard, save_model
from ray_inspect.io.images import read_image
from ray_inspect.io.synth import generate
from ray_inspect.records import ImageRecord


def big_image(work: str, side: int) -> str:
    generate(os.path.join(work, "tex"),
             SynthConfig(size=512, train=1, test_defective=0, test_good=0, validation=0))
    tile = (read_image(os.path.join(work, "tex", "train", "good", "000.png")) * 255).astype(np.uint8)
    img = np.tile(tile, (side // 512 + 1, side // 512 + 1))[:side, :side]
    rng = np.random.default_rng(0)
    for _ in range(20):                                   # scratches and stains
        y, x = rng.integers(0, side - 200, 2)
        img[y : y + 150, x : x + 6] = 20
        img[y + 50 : y + 90, x + 60 : x + 100] = 230
    path = os.path.join(work, "archive", "big0.png")
    os.makedirs(os.path.dirname(path))
    Image.fromarray(img).save(path, compress_level=1)
    return path


def read_record(path: str) -> ImageRecord:
    with open(path) as f:
        return ImageRecord.from_json(f.read())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--side", type=int, default=16_384)
    ap.add_argument("--region-pixels", type=int, default=InspectConfig.region_pixels)
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--scale", type=float, default=None,
                    help="the card's scale (a resizing model, e.g. 0.5); default: native resolution")
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="ri-large-")
    path = big_image(work, a.side)
    for i in range(1, a.images):
        shutil.copy(path, os.path.join(os.path.dirname(path), f"big{i}.png"))
    torch.manual_seed(0)
    url = os.path.join(work, "model")
    save_model(url, ConvAE(ModelConfig()), ModelCard(model=ModelConfig(), resize=None, threshold=0.6,
                                                              scale=a.scale))
    cfg = InspectConfig(region_pixels=a.region_pixels)
    t0 = time.perf_counter()
    summary = scan(url, os.path.dirname(path), os.path.join(work, "out"), cfg,
                   options=ScanOptions(workers=1, cpus_per_worker=1))
    wall = time.perf_counter() - t0
    records = os.path.join(work, "out", "records")
    recs = sorted((read_record(os.path.join(records, f"big{i}.json")) for i in range(a.images)),
                  key=lambda r: r.finished)
    rec = recs[0]
    print(json.dumps({
        "date": date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}", "image": f"{a.side}x{a.side} 8-bit gray PNG", "images": a.images,
        "scale": a.scale,
        "png_bytes": os.path.getsize(path), "region_pixels": a.region_pixels, "bands": rec.bands,
        "tiles": rec.tiles, "concurrency": summary["concurrency"], "compute_slots": summary["compute_slots"],
        "actor_peak_rss_gib_after_each": [round(r.max_rss_bytes / 2**30, 3) for r in recs],
        "actor_peak_rss_gib": round(max(r.max_rss_bytes for r in recs) / 2**30, 3),
        "exit_code": summary["exit_code"], "scan_wall_s": round(wall, 1), "timings_s": rec.timings,
        "flagged_pixels": rec.flagged_pixels, "regions": rec.regions,
        "megapixels_per_s": round(a.images * a.side * a.side / 1e6 / wall, 3),
        "residual_tiff_bytes": os.path.getsize(os.path.join(work, "out", "residuals", "big0.tiff")),
    }, indent=2))


if __name__ == "__main__":
    main()
