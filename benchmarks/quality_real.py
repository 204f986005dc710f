"""Detection quality on real MVTec-layout data sets, through the whole CLI flow, with an ablation.

For each DATASET root: ``prepare`` (default scaling), ``train`` once per training recipe,
``calibrate`` (a copy of the model per score option) on defect-free training images, ``scan`` of
test/, and a no-learning baseline on the same pixels. One JSON line per (data set, row) goes to
--out; a table is printed. docs/results.md quotes it.

Usage: python benchmarks/quality_real.py ../shared/data/kolektorsdd --work /tmp/quality-real
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time

import numpy as np

# Training recipes: the paper's optimiser, the converging schedule, the paper's with flips.
# (Adam at 1e-3 trains KolektorSDD well but collapses on the synthetic fabrics to a flat output.)
TRAININGS = {
    "paper": ["--lr", "2e-4", "--lr-schedule", "constant"],
    "cosine": ["--lr", "5e-4", "--lr-schedule", "cosine"],
    "flips": ["--lr", "2e-4", "--lr-schedule", "constant", "--augment", "flips"],
    "cosine-flips": ["--lr", "5e-4", "--lr-schedule", "cosine", "--augment", "flips"],
    "cosine-defects": ["--lr", "5e-4", "--lr-schedule", "cosine", "--synthetic-defects", "0.5"],
}
# Ablation rows: (name, training recipe, calibrate's score options).
ROWS = {
    "recommended": ("cosine", ["--smooth-sigma", "3", "--normalise", "features", "--adapt-contrast", "0.5"]),
    "schedule+smoothing+features": ("cosine", ["--smooth-sigma", "3", "--normalise", "features"]),
    "schedule+smoothing": ("cosine", ["--smooth-sigma", "4"]),
    "schedule+smoothing+position": ("cosine", ["--smooth-sigma", "4", "--normalise", "position"]),
    "schedule": ("cosine", []),
    "paper": ("paper", []),
    "smoothing": ("paper", ["--smooth-sigma", "4"]),
    "position": ("paper", ["--normalise", "position"]),
    "features": ("paper", ["--normalise", "features"]),
    "features+contrast": ("paper", ["--normalise", "features", "--adapt-contrast", "0.5"]),
    "schedule+smoothing+features+position": ("cosine",
                                             ["--smooth-sigma", "3", "--normalise", "features+position"]),
    "flips": ("flips", []),
    "schedule+flips+smoothing+position": ("cosine-flips", ["--smooth-sigma", "4", "--normalise", "position"]),
    "schedule+defects": ("cosine-defects", []),
    "schedule+defects+smoothing": ("cosine-defects", ["--smooth-sigma", "4"]),
    "schedule+defects+smoothing+position": ("cosine-defects",
                                            ["--smooth-sigma", "4", "--normalise", "position"]),
}


def cli(*args: str) -> dict:
    """Run ``ray-inspect ARGS --json`` and return its JSON; its stderr (progress) passes through."""
    cmd = [sys.executable, "-m", "ray_inspect.cli", *args, "--json"]
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out)


def _subset(folder: str, dest: str, k: int) -> str:
    """``k`` evenly spaced images of ``folder`` as links in ``dest`` (a smaller calibration set)."""
    names = sorted(os.listdir(folder))
    pick = [names[int(i)] for i in np.linspace(0, len(names) - 1, min(k, len(names)))]
    os.makedirs(dest, exist_ok=True)
    for n in pick:
        link = os.path.join(dest, n)
        if not os.path.exists(link):
            os.symlink(os.path.abspath(os.path.join(folder, n)), link)
    return dest


def _contrast_copy(root: str, dest: str, gain: float) -> str:
    """A copy of the data set whose test images have their contrast about their mean scaled by
    ``gain`` (a camera's gain drifting after calibration); train/ and ground_truth/ are links."""
    from PIL import Image

    for part in ("train", "ground_truth"):
        link = os.path.join(dest, part)
        if not os.path.exists(link):
            os.makedirs(dest, exist_ok=True)
            os.symlink(os.path.abspath(os.path.join(root, part)), link)
    for folder, _, files in os.walk(os.path.join(root, "test")):
        out = os.path.join(dest, os.path.relpath(folder, root))
        os.makedirs(out, exist_ok=True)
        for n in files:
            if os.path.exists(os.path.join(out, n)):
                continue
            with Image.open(os.path.join(folder, n)) as im:
                if im.mode not in ("L", "RGB"):
                    raise SystemExit(f"{os.path.join(folder, n)}: --test-contrast takes 8-bit grey or RGB")
                x, fmt = np.asarray(im, np.float64), im.format
            y = np.clip(np.rint(x.mean() + gain * (x - x.mean())), 0, 255).astype(np.uint8)
            Image.fromarray(y).save(os.path.join(out, n + ".part"), format=fmt)   # lossy for JPEG
            os.replace(os.path.join(out, n + ".part"), os.path.join(out, n))
    return dest


def _train(a: argparse.Namespace, name: str, patches: str) -> tuple[str, float]:
    model = os.path.join(a.work, f"model-{name}")
    if os.path.exists(os.path.join(model, "card.json")):
        with open(os.path.join(model, "card.json")) as f:
            return model, json.load(f)["training"].get("wall_seconds", float("nan"))
    t0 = time.time()
    cli("train", patches, model, "--epochs", str(a.epochs), "--batch-size", str(a.batch_size),
        "--precision", a.precision, "--storage", os.path.join(a.work, "runs"), "--run-name", name,
        "--seed", str(a.seed), *TRAININGS[name])
    seconds = time.time() - t0
    with open(os.path.join(model, "card.json")) as f:
        card = json.load(f)
    card["training"]["wall_seconds"] = round(seconds, 1)   # kept beside the card for reruns of this script
    with open(os.path.join(model, "card.json"), "w") as f:
        json.dump(card, f, indent=2, sort_keys=True)
    return model, seconds


def _row(a: argparse.Namespace, root: str, row: str, patches: str, calib: str, tag: str = "") -> dict:  # noqa: PLR0913 - the run, what to scan and calibrate on
    recipe, score = ROWS[row]
    trained, train_s = _train(a, recipe, patches)
    model = os.path.join(a.work, f"model-{recipe}-{row}")
    if not os.path.exists(model):
        shutil.copytree(trained, model)
    t0 = time.time()
    cal = cli("calibrate", model, calib, "--fpr", "0.01", *score)
    out = os.path.join(a.work, f"scan-{row}{tag}")
    summary = cli("scan", model, root, out)
    scan_s = time.time() - t0
    m = summary["metrics"]
    return {"row": row, "training": recipe, "train_args": TRAININGS[recipe], "score": cal["score"],
            "pixel_auroc": m["pixel_auroc"],
            "au_pro": m["au_pro"], "image_auroc": m["image_auroc"], "threshold": cal["threshold"],
            "train_seconds": round(train_s, 1), "calibrate_scan_seconds": round(scan_s, 1)}


def baseline(root: str, scale: float) -> dict:
    """The no-learning detector on the scan's pixels: each pixel's deviation from its local mean
    (Gaussian sigma 6) averaged over sigma 3, over the local contrast (RMS deviation, sigma 12)."""
    from scipy.ndimage import gaussian_filter
    from sklearn.metrics import roc_auc_score

    from ray_inspect.core.metrics import au_pro, image_auroc
    from ray_inspect.io.datasets import list_samples
    from ray_inspect.io.images import read_image, read_mask, resize_image, resize_mask, scaled_shape

    scores, masks, image_scores, labels = [], [], [], []
    for s in list_samples(root):
        img = read_image(s.url)
        gt = read_mask(s.mask_url, img.shape[:2]) if s.defective else np.zeros(img.shape[:2], bool)
        shape = scaled_shape(*img.shape[:2], scale)
        if shape != img.shape[:2]:
            img, gt = resize_image(img, shape), resize_mask(gt, shape)
        d = img - gaussian_filter(img, 6)
        score = gaussian_filter(np.abs(d), 3) / (np.sqrt(gaussian_filter(d * d, 12)) + 1e-3)
        scores.append(score.astype(np.float32))
        masks.append(gt)
        image_scores.append(float(score.max()))
        labels.append(bool(s.defective))
    y = np.concatenate([m.ravel() for m in masks])
    flat = np.concatenate([x.ravel() for x in scores])
    return {"row": "no-learning baseline", "pixel_auroc": float(roc_auc_score(y, flat)),
            "au_pro": float(au_pro(scores, masks)), "image_auroc": float(image_auroc(image_scores, labels))}


def _machine() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor()
    return f"{name}, {os.cpu_count()} CPUs"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("datasets", nargs="+", help="MVTec-layout roots (train/good, test/<type>, ground_truth/)")
    ap.add_argument("--work", default="/tmp/ray-inspect-quality-real")
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--patches", type=int, default=2500)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0, help="training seed (a new --work per seed)")
    ap.add_argument("--precision", default="bfloat16", help="float32 is used where the CPU lacks native bf16")
    ap.add_argument("--calibration-images", type=int, default=80,
                    help="defect-free training images (evenly spaced) that calibration uses")
    ap.add_argument("--baseline-scales", type=float, nargs="*", default=[],
                    help="also the no-learning baseline at these scales (its sigmas are in processed pixels)")
    ap.add_argument("--test-contrast", type=float, default=1.0,
                    help="scan test images whose contrast is scaled by this factor (calibration unchanged)")
    ap.add_argument("--out", default="benchmarks/quality_real.jsonl")
    a = ap.parse_args()
    base_work = a.work
    for root in a.datasets:
        name = os.path.basename(os.path.normpath(root))
        a.work = os.path.join(base_work, name)
        os.makedirs(a.work, exist_ok=True)
        patches = os.path.join(a.work, "patches.zarr")
        if not os.path.exists(os.path.join(patches, "zarr.json")):
            print(cli("prepare", root, patches, "--patches", str(a.patches))["scale"], file=sys.stderr)
        with open(os.path.join(patches, "zarr.json")) as f:
            scale = json.load(f)["attributes"]["scale"]
        calib = _subset(os.path.join(root, "train", "good"), os.path.join(a.work, "calibration"),
                        a.calibration_images)
        common = {"dataset": name, "scale": scale, "date": dt.date.today().isoformat(), "machine": _machine(),
                  "schedule": {"patches": a.patches, "epochs": a.epochs, "batch_size": a.batch_size,
                               "seed": a.seed},
                  "calibration_images": a.calibration_images}
        tag, scanned = "", root
        if a.test_contrast != 1:
            tag = f"-contrast{a.test_contrast:g}"
            scanned = _contrast_copy(root, os.path.join(a.work, f"data{tag}"), a.test_contrast)
            common["test_contrast"] = a.test_contrast
        rows = [baseline(scanned, scale)]
        rows += [{**baseline(scanned, s), "row": f"no-learning baseline at scale {s:g}"}
                 for s in a.baseline_scales]
        rows += [_row(a, scanned, r, patches, calib, tag) for r in a.rows]
        for r in rows:
            line = {**common, **r}
            print(json.dumps(line), flush=True)
            with open(a.out, "a") as f:
                f.write(json.dumps(line) + "\n")
        print(f"\n{name} (scale {scale:.3g})\n{'row':40} pixel AUROC  AU-PRO  image AUROC")
        for r in rows:
            print(f"{r['row']:40} {r['pixel_auroc']:11.3f} {r['au_pro']:7.3f} {r['image_auroc']:12.3f}")


if __name__ == "__main__":
    main()
