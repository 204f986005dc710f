"""Training throughput: Ray Train with 1 and 2 workers vs a plain single-process PyTorch loop.

Same Zarr patches, batch size and precision; patches/s of the epochs after the first (start-up,
Ray's and the first epoch's warm-up, excluded). Prints JSON; docs/benchmarks.md records it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
from datetime import date

import torch

from ray_inspect.config import ModelConfig, PrepareConfig, RunConfig, SynthConfig, TrainConfig
from ray_inspect.distributed.cluster import ensure_ray
from ray_inspect.distributed.train import TrainHooks, fit
from ray_inspect.io.patches import open_patches, prepare
from ray_inspect.io.synth import generate
from ray_inspect.steps.training import PatchBatches, build, train_epoch


def plain_loop(patches: str, cfg: TrainConfig) -> list[float]:
    """The reference: the epoch loop in this process, no Ray, no DDP."""
    model, opt, loss_fn = build(ModelConfig(), cfg)
    data = PatchBatches(open_patches(patches), cfg.batch_size, seed=cfg.seed)
    return [train_epoch(model, opt, data.epoch(e), loss_fn, cfg.precision)["patches_per_s"]
            for e in range(cfg.epochs)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--patches", type=int, default=2048)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=64)
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="ri-train-bench-")
    generate(os.path.join(work, "data"), SynthConfig(train=20, validation=0, test_good=0, test_defective=0))
    pz = os.path.join(work, "p.zarr")
    prepare(os.path.join(work, "data"), pz, PrepareConfig(patches=a.patches))
    cfg = TrainConfig(epochs=a.epochs, batch_size=a.batch_size)
    out = {"date": date.today().isoformat(),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
           "patches": a.patches, "batch_size": a.batch_size, "epochs": a.epochs, "precision": cfg.precision}
    out["plain_patches_per_s"] = statistics.median(plain_loop(pz, cfg)[1:])
    ensure_ray(num_cpus=os.cpu_count())
    for workers in (1, 2):
        seen: list[dict] = []
        fit(pz, os.path.join(work, f"m{workers}"), ModelConfig(), cfg,
            RunConfig(workers=workers, storage=os.path.join(work, "runs"), run_name=f"w{workers}"),
            hooks=TrainHooks(on_epoch=seen.append))
        out[f"ray_{workers}_worker_patches_per_s"] = statistics.median(m["patches_per_s"] for m in seen[1:])
    out["ray_overhead_1_worker"] = 1 - out["ray_1_worker_patches_per_s"] / out["plain_patches_per_s"]
    out["scaling_2_vs_1"] = out["ray_2_worker_patches_per_s"] / out["ray_1_worker_patches_per_s"]
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}, indent=2))


if __name__ == "__main__":
    main()
