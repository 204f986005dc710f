"""Quality of the four variants on the synthetic fabrics: synth -> prepare -> train -> calibrate -> scan.

Writes a JSON line per (texture, variant) to the --out file; docs/results.md quotes the table.
Usage: python benchmarks/quality.py --work /tmp/quality --textures plain --variants ssim l2 vae fm
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from ray_inspect.config import ModelConfig, PrepareConfig, RunConfig, SynthConfig, TrainConfig
from ray_inspect.core.model import AlexNetFeatures
from ray_inspect.distributed.scan import scan
from ray_inspect.distributed.train import TrainHooks, fit
from ray_inspect.io.patches import prepare
from ray_inspect.io.synth import generate
from ray_inspect.steps.calibrate import calibrate


def _epoch_lines(label: str):
    """An epoch callback that prints one line per epoch, starting with ``label``."""
    def on_epoch(s: dict) -> None:
        print(f"{label} epoch {s['epoch']} loss {s['loss']:.4f} {s['patches_per_s']:.0f}/s", flush=True)
    return on_epoch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/ray-inspect-quality")
    ap.add_argument("--textures", nargs="+", default=["plain"])
    ap.add_argument("--variants", nargs="+", default=["ssim", "l2", "vae", "fm"])
    ap.add_argument("--patches", type=int, default=5000)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", default="benchmarks/quality.jsonl")
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    alexnet = os.path.join(a.work, "alexnet-random.pth")
    torch.manual_seed(0)
    torch.save(AlexNetFeatures().state_dict(), alexnet)  # no pretrained weights can be downloaded here
    for tex in a.textures:
        root = os.path.join(a.work, tex)
        if not os.path.exists(os.path.join(root, "test")):
            generate(root, SynthConfig(texture=tex))
        pz = os.path.join(a.work, f"{tex}.zarr")
        prepare(root, pz, PrepareConfig(patches=a.patches))
        for v in a.variants:
            row = _variant(a, tex, v, alexnet if v == "fm" else None)
            print(json.dumps(row), flush=True)
            with open(a.out, "a") as f:
                f.write(json.dumps(row) + "\n")


def _variant(a: argparse.Namespace, tex: str, v: str, alexnet: str | None) -> dict:
    """Train variant ``v`` on texture ``tex``, calibrate it, scan the test set: the table's row."""
    root, pz = os.path.join(a.work, tex), os.path.join(a.work, f"{tex}.zarr")
    t0 = time.time()
    model = os.path.join(a.work, f"{tex}-{v}")
    card = fit(pz, model, ModelConfig(loss=v), TrainConfig(epochs=a.epochs, batch_size=a.batch_size),
               RunConfig(storage=os.path.join(a.work, "runs"), run_name=f"{tex}-{v}"),
               alexnet_weights=alexnet, hooks=TrainHooks(on_epoch=_epoch_lines(f"{tex} {v}")))
    t_train = time.time() - t0
    cal = calibrate(model, root, min_area=50)
    summary = scan(model, root, os.path.join(a.work, f"{tex}-{v}-scan"))
    return {"texture": tex, "variant": v, **summary["metrics"], "threshold": cal["threshold"],
            "train_seconds": round(t_train, 1), "final_loss": card.training["final_loss"],
            "schedule": {"patches": a.patches, "epochs": a.epochs, "batch_size": a.batch_size,
                         "resize": 256, "precision": "bfloat16", "lr": 2e-4, "weight_decay": 1e-5}}

if __name__ == "__main__":
    main()
