"""The per-image step in bands: bit-for-bit the whole-image result, in bounded memory."""

import numpy as np
import pytest
import torch

from ray_inspect.config import InspectConfig, ModelConfig
from ray_inspect.core.model import build_model
from ray_inspect.io.artifact import ModelCard
from ray_inspect.steps.inspector import Inspector


def _inspector(loss, precision, region_pixels, threshold=None):
    torch.manual_seed(0)
    cfg = ModelConfig(loss=loss)
    card = ModelCard(model=cfg, resize=None, threshold=threshold)
    return Inspector(build_model(cfg), card, InspectConfig(precision=precision, region_pixels=region_pixels))


def _texture(h, w, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    img = 0.5 + 0.25 * np.sin(xx / 3.0) * np.cos(yy / 4.0) + 0.1 * rng.standard_normal((h, w))
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


@pytest.mark.parametrize("loss,precision,shape,region", [
    ("ssim", "float32", (500, 413), 40_000),     # sizes the stride does not divide
    ("ssim", "bfloat16", (530, 260), 20_000),
    ("vae", "float32", (300, 200), 15_000),      # per-window noise seeds: bands see the same samples
    ("l2", "bfloat16", (300, 2100), 200_000),    # a row of windows wider than a batch
])
def test_bands_equal_the_whole_image_exactly(loss, precision, shape, region):
    img = _texture(*shape)
    t = float(np.quantile(_inspector(loss, precision, 1 << 30).inspect(img, "k").opened, 0.9))
    whole = _inspector(loss, precision, 1 << 30, t).inspect(img, "k")
    banded_insp = _inspector(loss, precision, region, t)
    bands = list(banded_insp.bands(img, "k"))
    assert len(bands) > 2 and [b.rows[0] for b in bands] == sorted(b.rows[0] for b in bands)
    banded = banded_insp.inspect(img, "k")
    np.testing.assert_array_equal(banded.residual, whole.residual)
    np.testing.assert_array_equal(banded.opened, whole.opened)
    np.testing.assert_array_equal(banded.mask, whole.mask)
    assert 0 < whole.mask.sum() < whole.mask.size       # the threshold cuts through the map
    # the bands ran more windows than the image has (their margins overlap), never fewer
    assert banded.tiles >= whole.tiles


def test_4096_rows_region_wise_equals_whole():
    """A 4096-row image in bands of 600 rows (7 bands, the last one short); two columns of windows
    keep it quick, and bands are cut across rows whatever the width."""
    img = _texture(4096, 158, seed=1)
    t = float(np.quantile(_inspector("ssim", "bfloat16", 1 << 26).inspect(img, "big").opened, 0.9))
    whole = _inspector("ssim", "bfloat16", 1 << 26, t).inspect(img, "big", keep_opened=False)
    banded_insp = _inspector("ssim", "bfloat16", 158 * 600, t)
    assert banded_insp.band_rows(4096, 158) == 600
    assert len(list(banded_insp.bands(img, "big", keep_opened=False))) == 7
    banded = banded_insp.inspect(img, "big", keep_opened=False)
    np.testing.assert_array_equal(banded.residual, whole.residual)
    np.testing.assert_array_equal(banded.mask, whole.mask)
    assert whole.tiles == 134 * 2 and 0 < whole.mask.sum() < whole.mask.size


def test_images_scale_like_the_training_images():
    card = ModelCard(model=ModelConfig(), resize=256, source_size=(512, 512))
    assert card.processing_shape(512, 512) == (256, 256)
    assert card.processing_shape(4096, 2048) == (2048, 1024)     # same factor, not a fixed square
    assert ModelCard(model=ModelConfig(), resize=256).processing_shape(300, 500) == (256, 256)  # older cards
    assert ModelCard(model=ModelConfig(), resize=None).processing_shape(300, 500) == (300, 500)


def test_an_older_card_without_a_scale_reads_and_limits_images(tmp_path):
    """A card from before the scale factor (``resize`` and ``source_size``) still reads images,
    and the pixel limit at its processing size is one line naming the image."""
    from PIL import Image

    from ray_inspect.io.datasets import Sample
    from ray_inspect.records import InputError

    Image.fromarray(np.full((128, 96), 90, np.uint8)).save(tmp_path / "a.png")   # scaled up, 2x
    card = ModelCard(model=ModelConfig(), resize=256, source_size=(128, 128))
    sample = Sample(str(tmp_path / "a.png"), "a.png")
    model = build_model(ModelConfig())
    assert Inspector(model, card, InspectConfig(precision="float32")).read(sample).pixels.shape == (256, 192)
    small = Inspector(model, card, InspectConfig(precision="float32", max_pixels=256 * 192 - 1))
    with pytest.raises(InputError, match="at the model's processing size") as err:
        small.read(sample)
    assert err.value.kind == "size" and str(err.value).startswith(str(tmp_path / "a.png"))


def test_a_card_written_with_a_stride_still_loads():
    """Cards once carried the training stride (never read); older cards keep loading."""
    import json

    card = ModelCard(model=ModelConfig(), resize=256, source_size=(512, 512), threshold=0.25)
    old = json.loads(card.to_json())
    assert "stride" not in old
    loaded = ModelCard.from_json(json.dumps({**old, "stride": 30}))
    assert loaded == card and loaded.fingerprint == card.fingerprint
