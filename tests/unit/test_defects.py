"""Synthetic defects for training: where they go, how many, and that targets stay clean."""

import numpy as np
import pytest

from ray_inspect.core.defects import blob_mask, line_mask, paste_defects
from ray_inspect.io.patches import open_patches
from ray_inspect.steps.training import PatchBatches


def _texture(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(60, 200, size=(n, 1, 128, 128), dtype=np.uint8)


def test_a_share_of_the_patches_carries_a_defect_and_the_batch_is_left_as_it_was():
    batch = _texture(400)
    before = batch.copy()
    out = paste_defects(batch, 0.3, np.random.default_rng(1))
    assert np.array_equal(batch, before)                              # a copy, not in place
    changed = (out != batch).reshape(len(batch), -1).any(1)
    assert abs(changed.mean() - 0.3) < 3 * np.sqrt(0.3 * 0.7 / 400)   # binomial: within 3 sigma
    share = (out != batch).reshape(len(batch), -1).mean(1)[changed]
    assert share.max() < 0.2                                          # a defect, not a new patch
    assert np.array_equal(paste_defects(batch, 0.0, np.random.default_rng(1)), batch)
    again = paste_defects(batch, 0.3, np.random.default_rng(1))
    assert np.array_equal(again, out)                                 # seeded: a resumed run matches


@pytest.mark.parametrize("seed", range(20))
def test_masks_cover_what_they_claim(seed):
    rng = np.random.default_rng(seed)
    blob = blob_mask(128, 128, rng)
    assert 0.003 < (blob > 0.5).mean() < 0.12 and blob.min() >= 0 and blob.max() <= 1
    line = line_mask(128, 128, rng)
    ys, xs = np.nonzero(line > 0.5)
    assert len(ys) >= 10 and np.hypot(np.ptp(ys), np.ptp(xs)) >= 10   # a stroke, not a dot
    assert (line > 0.5).mean() < 0.05


def test_training_batches_with_defects_keep_their_order_and_clean_targets(patches):
    arr = open_patches(patches)
    plain = list(PatchBatches(arr, 50, seed=0).epoch(2))
    marked = list(PatchBatches(arr, 50, seed=0, defects=0.5).epoch(2))
    assert len(plain) == len(marked)
    for (x0, t0), (_, t1) in zip(plain, marked, strict=True):
        assert x0 is t0 and np.array_equal(t0.numpy(), t1.numpy())   # same patches, clean targets
    changed = np.concatenate([(x != t).flatten(1).any(1).numpy() for x, t in marked])
    assert 0.35 < changed.mean() < 0.65
