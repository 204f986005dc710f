"""The baselines through the whole pipeline (train -> calibrate -> scan -> report), and a scan large
enough for two statistics shards, whose merged metrics equal sklearn's on all pixels."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from ray_inspect.config import InspectConfig, ModelConfig, ScanOptions, TrainConfig
from ray_inspect.core.model import AlexNetFeatures
from ray_inspect.distributed.scan import scan
from ray_inspect.io.artifact import load_model, save_model
from ray_inspect.io.datasets import list_samples
from ray_inspect.io.patches import open_patches
from ray_inspect.report import write_report
from ray_inspect.steps.calibrate import calibrate
from ray_inspect.steps.inspector import Inspector
from ray_inspect.steps.training import PatchBatches, build, make_card, train_epoch

pytestmark = pytest.mark.slow
FAST = InspectConfig(precision="float32")


@pytest.mark.parametrize("loss", ["l2", "vae", "fm"])
def test_baselines_train_calibrate_scan_and_report(ray_session, dataset, patches, tmp_path, loss):
    alexnet = None
    if loss == "fm":                                   # no ImageNet weights here: a random AlexNet state dict
        torch.manual_seed(1)
        alexnet = str(tmp_path / "alexnet.pth")
        torch.save(AlexNetFeatures().state_dict(), alexnet)
    cfg = ModelConfig(loss=loss, latent=16, vae_samples=2)
    tcfg = TrainConfig(epochs=1, batch_size=32, precision="float32")
    model, opt, loss_fn = build(cfg, tcfg, alexnet)
    stats = train_epoch(model, opt, PatchBatches(open_patches(patches), 32).epoch(0), loss_fn, "float32")
    assert stats["patches"] == 300 and np.isfinite(stats["loss"])
    url = str(tmp_path / "model")
    save_model(url, model, make_card(cfg, tcfg, patches, dict(open_patches(patches).attrs), [stats]))
    cal = calibrate(url, dataset, fpr=0.01, cfg=FAST)
    assert load_model(url).card.threshold == cal["threshold"] and cal["images"] == 4
    out = tmp_path / "out"
    summary = scan(url, dataset, str(out), FAST)
    assert summary["exit_code"] == 0 and summary["scanned"] == 12
    m = json.loads((out / "metrics.json").read_text())
    assert m["images"] == 12 and m["defective"] == 8
    model = load_model(url)
    insp = Inspector(model, model.card, FAST)
    scores, labels = [], []
    for s in list_samples(dataset):
        img, gt = insp.load(s)
        scores.append(insp.inspect(img, s.key).residual.ravel())
        labels.append(gt.ravel())
    assert abs(m["pixel_auroc"] - roc_auc_score(np.concatenate(labels), np.concatenate(scores))) <= 1e-3
    rep = write_report(str(out), worst=1)
    assert rep["pixel_auroc"] == m["pixel_auroc"] and (out / "roc.png").stat().st_size > 1000


def test_two_statistics_shards_merge_to_sklearns_metrics(ray_session, calibrated, tmp_path):
    """300 labelled images (shards of 256): the merged pixel ROC equals sklearn's on every pixel."""
    root = tmp_path / "many"
    rng = np.random.default_rng(0)
    for i in range(300):
        img = (rng.random((64, 96)) * 80 + 88).astype(np.uint8)
        kind = "spot" if i % 3 else "good"
        if kind == "spot":
            y, x = rng.integers(8, 48), rng.integers(8, 72)
            img[y : y + 10, x : x + 12] = 250
            mask = np.zeros((64, 96), np.uint8)
            mask[y : y + 10, x : x + 12] = 255
            (root / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask).save(root / "ground_truth" / kind / f"{i:03d}_mask.png")
        (root / "test" / kind).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / "test" / kind / f"{i:03d}.png")
    out = tmp_path / "out"
    summary = scan(calibrated[0], str(root), str(out), FAST, options=ScanOptions(shard_size=256))
    assert summary["scanned"] == 300
    shards = sorted(p.name for p in (out / "stats").glob("shard-*.npz"))
    assert shards == ["shard-00000.npz", "shard-00001.npz"]
    m = json.loads((out / "metrics.json").read_text())
    model = load_model(calibrated[0])
    insp = Inspector(model, model.card, FAST)
    scores, labels, img_scores, img_labels = [], [], [], []
    for s in list_samples(str(root)):
        img, gt = insp.load(s)
        res = insp.inspect(img, s.key)
        scores.append(res.residual.ravel())
        labels.append(gt.ravel())
        img_scores.append(res.score)
        img_labels.append(bool(gt.any()))
    assert m["images"] == 300
    assert abs(m["pixel_auroc"] - roc_auc_score(np.concatenate(labels), np.concatenate(scores))) <= 1e-3
    assert abs(m["image_auroc"] - roc_auc_score(img_labels, img_scores)) <= 1e-9
