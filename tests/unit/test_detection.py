"""Detection quality, as a regression test: a short, seeded training on a small synthetic fabric must
find its defects (pixel AUROC above a measured bound, and clearly above the L2-AE's), so a change
that breaks detection fails CI while one that only changes speed does not.

Measured with this schedule (2-core AMD EPYC, float32, 2026-12-02): SSIM-AE 0.826, L2-AE 0.537, and
an autoencoder whose output is constant (what a broken loss or training leaves) 0.465. The bound
sits between the SSIM-AE and the others, with room for other CPUs' float rounding.
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from ray_inspect.config import InspectConfig, ModelConfig, PrepareConfig, SynthConfig, TrainConfig
from ray_inspect.io.artifact import ModelCard
from ray_inspect.io.datasets import list_samples
from ray_inspect.io.patches import open_patches, prepare
from ray_inspect.io.synth import generate
from ray_inspect.steps.inspector import Inspector
from ray_inspect.steps.training import PatchBatches, build, set_lr, train_epoch

SCHEDULE = TrainConfig(epochs=3, batch_size=32, lr=5e-4, lr_schedule="cosine", precision="float32", seed=0)
PATCHES = 600
SSIM_BOUND = 0.75
MARGIN_OVER_L2 = 0.15


@pytest.fixture(scope="module")
def fabric(tmp_path_factory):
    """A small plain weave like the demo's (512 px, scaled to 256) and its patches: (root, patches, scale)."""
    base = tmp_path_factory.mktemp("detection")
    root = str(base / "plain")
    cfg = SynthConfig(texture="plain", size=512, train=8, test_defective=8, test_good=2, validation=0, seed=3)
    generate(root, cfg)
    attrs = prepare(root, str(base / "p.zarr"), PrepareConfig(patches=PATCHES, chunk=128, seed=0))
    return root, str(base / "p.zarr"), attrs["scale"]


def trained(loss: str, patches_url: str):
    model, opt, loss_fn = build(ModelConfig(loss=loss), SCHEDULE)
    data = PatchBatches(open_patches(patches_url), SCHEDULE.batch_size, seed=SCHEDULE.seed)
    for epoch in range(SCHEDULE.epochs):
        set_lr(opt, SCHEDULE, epoch)
        train_epoch(model, opt, data.epoch(epoch), loss_fn, SCHEDULE.precision)
    return model


def pixel_auroc(model, loss: str, root: str, scale: float) -> float:
    """sklearn's pixel AUROC of the residual maps of every test image (processing scale)."""
    card = ModelCard(model=ModelConfig(loss=loss), resize=None, scale=scale)
    insp = Inspector(model, card, InspectConfig(precision="float32"))
    scores, labels = [], []
    for s in list_samples(root):
        img, gt = insp.load(s)
        scores.append(insp.inspect(img, s.key, keep_opened=False).residual.ravel())
        labels.append(gt.ravel())
    return float(roc_auc_score(np.concatenate(labels), np.concatenate(scores)))


@pytest.mark.slow
def test_the_ssim_autoencoder_finds_defects(fabric):
    root, patches, scale = fabric
    ssim = pixel_auroc(trained("ssim", patches), "ssim", root, scale)
    l2 = pixel_auroc(trained("l2", patches), "l2", root, scale)
    assert ssim >= SSIM_BOUND, f"SSIM-AE pixel AUROC {ssim:.3f} < {SSIM_BOUND}"
    assert ssim >= l2 + MARGIN_OVER_L2, f"SSIM-AE {ssim:.3f} is not clearly above the L2-AE {l2:.3f}"
