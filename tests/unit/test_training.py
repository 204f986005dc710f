"""Patch preparation in Zarr, the training loop, and the driver's epoch progress."""

import logging
import queue
import time

import numpy as np
import pytest
import torch
import zarr

from ray_inspect.config import ModelConfig, PrepareConfig, TrainConfig
from ray_inspect.distributed.train import _ProgressPump
from ray_inspect.io.images import read_image, to_uint8
from ray_inspect.io.patches import open_patches, prepare
from ray_inspect.io.storage import StorageError
from ray_inspect.steps.training import PatchBatches, build, train_epoch


def test_prepare_layout_attributes_and_crops(dataset, patches, tmp_path):
    arr = open_patches(patches)
    assert arr.shape == (300, 1, 128, 128) and arr.dtype == np.uint8 and arr.chunks[0] == 64
    assert arr.attrs["complete"] and arr.attrs["scale"] == 1.0 and arr.attrs["seed"] == 1
    assert arr.attrs["source"] == dataset and len(arr.attrs["fingerprint"]) == 16
    # every patch is a real crop of some training image
    from ray_inspect.io.datasets import train_images

    imgs = [to_uint8(read_image(u)) for u in train_images(dataset)]
    p = arr[5, 0]
    hits = [np.argwhere(np.all(np.lib.stride_tricks.sliding_window_view(im, (128, 128)) == p, axis=(2, 3)))
            for im in imgs]
    assert any(len(h) for h in hits)
    again = str(tmp_path / "again.zarr")
    prepare(dataset, again, PrepareConfig(patches=300, short_side=None, chunk=64, seed=1))
    assert open_patches(again).attrs["fingerprint"] == arr.attrs["fingerprint"]


def test_incomplete_array_is_refused(tmp_path):
    url = str(tmp_path / "half.zarr")
    zarr.create_array(store=url, shape=(4, 1, 128, 128), chunks=(2, 1, 128, 128), dtype="uint8",
                      attributes={"complete": False})
    with pytest.raises(StorageError, match="incomplete"):
        open_patches(url)


def test_batches_cover_the_shard_once_and_reshuffle(patches):
    arr = open_patches(patches)
    data = PatchBatches(arr, batch_size=50, seed=0, window=2)
    seen = np.concatenate([b.numpy().reshape(len(b), -1)[:, :64] for _, b in data.epoch(0)])
    assert len(seen) == 300
    ref = arr[:].reshape(300, -1)[:, :64].astype(np.float32) / 255
    assert sorted(map(bytes, seen.astype(np.float32))) == sorted(map(bytes, ref))
    first0, _ = next(iter(data.epoch(0)))
    first1, _ = next(iter(data.epoch(1)))
    assert not torch.equal(first0, first1)
    shards = [PatchBatches(arr, 50, seed=0, rank=r, world=2) for r in range(2)]
    assert sum(sum(len(b) for b, _ in s.epoch(3)) for s in shards) == 300


def _indexed(tmp_path, n, chunk):
    """A patch array whose patch i carries i in its first two pixels."""
    arr = zarr.create_array(store=str(tmp_path / f"i{n}-{chunk}.zarr"), shape=(n, 1, 128, 128),
                            chunks=(chunk, 1, 128, 128), dtype="uint8")
    data = np.zeros((n, 1, 128, 128), np.uint8)
    data[:, 0, 0, 0], data[:, 0, 0, 1] = np.arange(n) % 256, np.arange(n) // 256
    arr[:] = data
    return arr


@pytest.mark.parametrize("n,chunk", [(256, 256), (600, 256), (2560, 256), (7, 4)])   # 1, 3 unequal, 10 chunks
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("batch", [32, 128])
def test_every_rank_runs_the_same_steps_and_every_patch_is_seen_once(tmp_path, n, chunk, world, batch):
    arr = _indexed(tmp_path, n, chunk)
    for epoch in (0, 1):
        shards = [[b for b, _ in PatchBatches(arr, batch, seed=0, rank=r, world=world).epoch(epoch)]
                  for r in range(world)]
        steps = {len(s) for s in shards}
        assert len(steps) == 1                                            # DDP: equal step counts
        seen = np.concatenate([(b[:, 0, 0, 0] * 255 + b[:, 0, 0, 1] * 255 * 256).round().numpy()
                               for s in shards for b in s]).astype(int)
        assert sorted(seen) == list(range(n))                             # each patch exactly once
        assert all(len(b) >= 1 for s in shards for b in s)
        sizes = [sum(len(b) for b in s) for s in shards]
        assert max(sizes) - min(sizes) <= 1


def test_a_layout_that_cannot_feed_the_workers_is_refused(tmp_path):
    from ray_inspect.steps.training import check_layout

    arr = _indexed(tmp_path, 2, 2)
    with pytest.raises(ValueError, match="2 patches cannot feed 3 workers"):
        PatchBatches(arr, 32, world=3, rank=0)
    with pytest.raises(ValueError, match="batch size 1"):
        check_layout(5, 2, 1)
    check_layout(6, 2, 1)


@pytest.mark.parametrize("loss", ["ssim", "l2", "vae"])
def test_loss_falls(patches, loss):
    arr = open_patches(patches)
    model, opt, loss_fn = build(ModelConfig(loss=loss, latent=32), TrainConfig(seed=0, batch_size=32))
    data = PatchBatches(arr, 32, seed=0)
    first = train_epoch(model, opt, data.epoch(0), loss_fn)
    second = train_epoch(model, opt, data.epoch(1), loss_fn)
    assert second["loss"] < first["loss"] and first["patches"] == 300


def test_feature_matching_needs_weights():
    with pytest.raises(ValueError, match="--alexnet-weights"):
        build(ModelConfig(loss="fm"), TrainConfig())


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def train_log():
    """Records of the training driver's logger (on the logger itself: propagation to the root varies
    with what configured logging before)."""
    logger, handler = logging.getLogger("ray_inspect.distributed.train"), _Records()
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


def test_progress_pump_delivers_every_epoch_and_keeps_the_first_callback_error(train_log):
    progress: queue.Queue = queue.Queue()
    seen = []

    def on_epoch(stats: dict) -> None:
        seen.append(stats["epoch"])
        if stats["epoch"] >= 2:
            raise RuntimeError(f"cannot print epoch {stats['epoch']}")

    with _ProgressPump(progress, on_epoch) as pump:
        progress.put({"epoch": 1})
        time.sleep(0.7)                                    # an empty poll in between
        for epoch in (2, 3):
            progress.put({"epoch": epoch})
    assert seen == [1, 2, 3]                               # all queued epochs delivered before the block ends
    assert isinstance(pump.error, RuntimeError) and str(pump.error) == "cannot print epoch 2"
    warnings = [r.getMessage() for r in train_log.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "epoch 2" in warnings[0] and "cannot print epoch 2" in warnings[0]


def test_progress_pump_stops_when_its_queue_is_gone(train_log):
    class Gone:                                            # what Ray's queue does once its actor died
        def empty(self) -> bool:
            raise ConnectionError("queue actor died")

        def get(self, timeout: float) -> dict:
            raise ConnectionError("queue actor died")

    seen: list = []
    with _ProgressPump(Gone(), seen.append, gone=(ConnectionError,)) as pump:
        pass
    assert seen == [] and pump.error is None
    assert any("queue actor died" in r.getMessage() for r in train_log.records)


@pytest.mark.parametrize("native, expected", [(False, "float32"), (True, "bfloat16")])
def test_bfloat16_training_only_where_the_cpu_runs_it_natively(patches, monkeypatch, native, expected):
    """Emulated bfloat16 autocast trains several times slower than float32 on CPUs without
    AVX-512 BF16/AMX: there the epoch runs in float32, as inference does."""
    import ray_inspect.core.inference as inference
    import ray_inspect.steps.training as training

    monkeypatch.setattr(inference, "bf16_supported", lambda device="cpu": native)
    used = []
    real = training.precision_context
    monkeypatch.setattr(training, "precision_context", lambda p, d: used.append(p) or real(p, d))
    model, opt, loss_fn = build(ModelConfig(latent=8), TrainConfig(batch_size=32))
    data = PatchBatches(open_patches(patches), 32, seed=0)
    batches = [b for _, b in zip(range(2), data.epoch(0), strict=False)]
    stats = train_epoch(model, opt, batches, loss_fn, "bfloat16")
    assert used == [expected, expected] and stats["patches"] == 64


def test_cosine_schedule_decays_from_lr_to_its_floor_and_depends_on_the_epoch_only():
    import math

    cfg = TrainConfig(epochs=9, lr=1e-3, lr_schedule="cosine", lr_floor=0.05)
    lrs = [cfg.lr_at(e) for e in range(9)]
    naive = [5e-5 + 0.5 * (1e-3 - 5e-5) * (1 + math.cos(math.pi * e / 8)) for e in range(9)]
    np.testing.assert_allclose(lrs, naive, rtol=1e-12)
    assert lrs[0] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(5e-5)
    assert all(a > b for a, b in zip(lrs, lrs[1:], strict=False))
    assert TrainConfig(lr=3e-4).lr_at(7) == 3e-4                     # the paper's constant rate
    model, opt, _ = build(ModelConfig(), TrainConfig(precision="float32"))
    from ray_inspect.steps.training import set_lr

    assert set_lr(opt, cfg, 4) == lrs[4] and all(g["lr"] == lrs[4] for g in opt.param_groups)
    with pytest.raises(ValueError, match="lr schedule"):
        TrainConfig(lr_schedule="step")


@pytest.mark.parametrize("how,count", [("flips", 4), ("dihedral", 8)])
def test_augmentation_applies_one_symmetry_per_patch(how, count):
    from ray_inspect.steps.training import augment

    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, (400, 1, 8, 8), dtype=np.uint8)

    def symmetries(p):
        out = []
        for t in (p, p.swapaxes(-1, -2)):
            out += [t, t[..., ::-1], t[..., ::-1, :], t[..., ::-1, ::-1]]
        return [bytes(np.ascontiguousarray(o)) for o in out[:count]]

    out = augment(batch, how, np.random.default_rng(1))
    # .index raises where an output patch is not a symmetry of its input
    used = [symmetries(p).index(bytes(o)) for p, o in zip(batch, out, strict=True)]
    counts = np.bincount(used, minlength=count)
    assert len(counts) == count and counts.min() > 400 / count / 2     # every symmetry occurs
    assert augment(batch, "none", rng) is batch


def test_scale_is_chosen_from_the_smallest_shorter_side_and_keeps_the_aspect_ratio(tmp_path):
    from PIL import Image

    from ray_inspect.io.patches import choose_scale, scale_reason

    good = tmp_path / "ds" / "train" / "good"
    good.mkdir(parents=True)
    sizes = [(300, 500), (310, 520), (400, 320), (320, 900), (600, 600)]   # (H, W)
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (h, w), dtype=np.uint8)).save(good / f"{i}.png")
    smallest = min(min(s) for s in sizes)                                  # 300
    scale, side = choose_scale(sorted(str(p) for p in good.iterdir()), PrepareConfig(short_side=150))
    assert side == smallest and scale == pytest.approx(150 / smallest)
    assert choose_scale([str(good / "0.png")], PrepareConfig(short_side=512))[0] == 1.0   # never enlarged
    assert choose_scale([str(good / "0.png")], PrepareConfig(scale=0.3))[0] == 0.3
    attrs = prepare(str(tmp_path / "ds"), str(tmp_path / "p.zarr"), PrepareConfig(patches=20, short_side=150,
                                                                                   chunk=8))
    assert attrs["scale"] == pytest.approx(0.5) and attrs["min_short_side"] == 300
    assert "scale 0.5" in scale_reason(attrs, PrepareConfig(short_side=150))
    assert "8 px" in scale_reason(attrs, PrepareConfig(short_side=150))    # 4-px opening at half scale
    with pytest.raises(ValueError, match="short side"):
        PrepareConfig(short_side=100)
