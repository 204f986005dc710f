"""Data sets of mixed image sizes: one scale factor for all, maps at each image's processing shape,
masks at each image's stored size, aligned with the ground truth pixel for pixel."""

import io

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from scipy.ndimage import distance_transform_edt

from ray_inspect.config import InspectConfig, ModelConfig, PrepareConfig, TrainConfig
from ray_inspect.core.model import build_model
from ray_inspect.io.artifact import save_model
from ray_inspect.io.images import scaled_shape
from ray_inspect.io.patches import prepare
from ray_inspect.steps.training import make_card

GREY = 128
TRAIN = [(300, 200)] * 3 + [(240, 360)] * 3                     # (H, W): two sizes, two orientations
DEFECTS = {"a": ((280, 420), (100, 150, 40, 70)), "b": ((390, 230), (250, 40, 60, 30))}  # (y, x, h, w)


def _png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


@pytest.fixture()
def mixed(tmp_path):
    root = tmp_path / "mixed"
    for i, (h, w) in enumerate(TRAIN):
        _png(root / "train" / "good" / f"{i}.png", np.full((h, w), GREY, np.uint8))
    for stem, ((h, w), (y, x, dh, dw)) in DEFECTS.items():
        img = np.full((h, w), GREY, np.uint8)
        img[y : y + dh, x : x + dw] = 255
        gt = np.zeros((h, w), np.uint8)
        gt[y : y + dh, x : x + dw] = 255
        _png(root / "test" / "spot" / f"{stem}.png", img)
        _png(root / "ground_truth" / "spot" / f"{stem}_mask.png", gt)
    _png(root / "test" / "good" / "g.png", np.full((310, 500), GREY, np.uint8))
    return root


def _constant_model(cfg: ModelConfig) -> torch.nn.Module:
    """An autoencoder that reconstructs every window as the defect-free grey."""
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.decoder[-1].bias.fill_(GREY / 255)
    return model


def test_mixed_sizes_scale_by_one_factor_and_masks_align_with_the_ground_truth(mixed, tmp_path, ray_session):
    from ray_inspect.distributed.scan import scan

    attrs = prepare(str(mixed), str(tmp_path / "p.zarr"), PrepareConfig(patches=16, short_side=128, chunk=8))
    scale = 128 / min(min(s) for s in TRAIN)                               # 128 / 200 px
    assert attrs["scale"] == pytest.approx(scale)
    cfg = ModelConfig()
    card = make_card(cfg, TrainConfig(), str(tmp_path / "p.zarr"), attrs, history=[])
    model_url = str(tmp_path / "model")
    save_model(model_url, _constant_model(cfg), card.__class__(**{**card.__dict__, "threshold": 0.1}))
    out = tmp_path / "scan"
    summary = scan(model_url, str(mixed), str(out), InspectConfig(precision="float32"))
    assert summary["scanned"] == 3 and summary["failed"] == 0
    assert summary["metrics"]["pixel_auroc"] > 0.99          # maps and resized ground truth align

    for stem, ((h, w), (y, x, dh, dw)) in DEFECTS.items():
        tiff = out / "residuals" / "test" / "spot" / f"{stem}.tiff"
        residual = tifffile.imread(io.BytesIO(tiff.read_bytes()))
        assert residual.shape == scaled_shape(h, w, scale)       # the same factor for every size
        mask = np.asarray(Image.open(out / "masks" / "test" / "spot" / f"{stem}.png")) > 0
        assert mask.shape == (h, w)                              # at the image's stored size
        gt = np.zeros((h, w), bool)
        gt[y : y + dh, x : x + dw] = True
        assert mask[gt].all()                                    # every defect pixel flagged
        # nothing flagged beyond the SSIM window's reach (5 px at processing scale) around the defect,
        # and the flagged region is centred on it: no shift between the mask and the image
        assert distance_transform_edt(~gt)[mask].max() <= 6 / scale
        np.testing.assert_allclose(np.argwhere(mask).mean(0), np.argwhere(gt).mean(0), atol=1.0)
    good = np.asarray(Image.open(out / "masks" / "test" / "good" / "g.png")) > 0
    assert good.shape == (310, 500) and not good.any()
