"""One image into OUT: outputs, the record written last, and band-wise outputs equal to whole ones."""

import json

import numpy as np
import tifffile
from PIL import Image

from ray_inspect.config import InspectConfig, ModelConfig
from ray_inspect.core.evaluation import Evaluation
from ray_inspect.core.model import build_model
from ray_inspect.io.artifact import ModelCard
from ray_inspect.io.datasets import Sample
from ray_inspect.steps.imagescan import ScanTarget, output_stems, output_urls, scan_image, streamed_stems
from ray_inspect.steps.inspector import Inspector


def test_output_stems_keep_paths_and_resolve_collisions():
    stems = output_stems(["a/x.png", "a/x.tiff", "a/y.png", "b/x.jpg"])
    assert stems == {"a/x.png": "a/x.png", "a/x.tiff": "a/x.tiff", "a/y.png": "a/y", "b/x.jpg": "b/x"}
    # a.png keeps its whole key (beside a.tiff), which is also a.png.tiff's stem
    assert output_stems(["a.png", "a.tiff", "a.png.tiff"]) == {"a.png": "a.png", "a.tiff": "a.tiff",
                                                               "a.png.tiff": "a.png.tiff"}


def test_output_stems_are_distinct_for_any_set_of_keys():
    rng = np.random.default_rng(0)
    parts = ["a", "a.png", "a.tiff", "b", ".png", "a.png.png", "x/a", "x"]
    for _ in range(2000):
        n = rng.integers(1, 8)
        keys = sorted({"".join(rng.choice(parts, size=rng.integers(1, 4))) for _ in range(n)})
        stems = output_stems(keys)
        assert len(set(stems.values())) == len(keys), keys
        assert all(s in (k, k.rsplit(".", 1)[0]) for k, s in stems.items())


def test_streamed_stems_equal_the_whole_listing_s_and_stay_distinct_in_any_window():
    """A listing that arrives as a stream gets the stems ``output_stems`` gives the whole listing
    (keys that can clash sit next to each other in key order); with a window too small for a group,
    its keys give way to their whole keys, still distinct."""
    rng = np.random.default_rng(1)
    parts = ["a", "b", "a.png", "a/x", "a.b", "1", "10", ".h", "a.png.png", "img.001"]
    ends = [".png", ".tiff", ".png.tiff", "/z.png", ".jpg", "0.png"]
    for _ in range(1500):
        keys = sorted({rng.choice(parts) + rng.choice(ends) for _ in range(rng.integers(1, 40))})
        whole = output_stems(keys)
        for window in (1, 2, 5, 256):
            got = dict(streamed_stems(keys, lambda k: k, window=window))
            assert list(got) == keys and len(set(got.values())) == len(keys), (window, keys)
            if window == 256:
                assert got == whole, keys
    numbered = sorted([f"{i}.png" for i in range(3000)] + [f"img.{i:04d}.png" for i in range(600)])
    assert all(s == k[:-4] for k, s in streamed_stems(numbered, lambda k: k))   # no neighbour clashes


def test_keys_out_of_order_are_named_by_their_whole_key_from_there_on():
    keys = ["a.png", "b.png", "c.png", "d.png", "a.tiff", "e.png", "f.png"]
    told = []
    got = list(streamed_stems(keys, lambda k: k, window=2, on_unsorted=told.append))
    assert told == [4] and len({s for _, s in got}) == len(keys)
    assert got[:2] == [("a.png", "a"), ("b.png", "b")]
    assert all(s == k for k, s in got[2:])          # from the window before the first key out of order


def _write_png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _bytes(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_banded_image_writes_the_same_outputs_as_a_whole_one(tmp_path):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:620, :410]
    img = (np.clip(0.5 + 0.3 * np.sin(xx / 4) * np.cos(yy / 5) + 0.1 * rng.standard_normal(xx.shape), 0, 1)
           * 255).astype(np.uint8)
    gt = np.zeros(img.shape, bool)
    gt[100:180, 50:90] = gt[400:410, 300:390] = True
    _write_png(tmp_path / "src" / "cut" / "a.png", img)
    _write_png(tmp_path / "src" / "gt" / "a_mask.png", gt.astype(np.uint8) * 255)
    sample = Sample(str(tmp_path / "src" / "cut" / "a.png"), "cut/a.png", "cut",
                    str(tmp_path / "src" / "gt" / "a_mask.png"), "v1")
    cfg = ModelConfig()
    model = build_model(cfg)
    probe = Inspector(model, ModelCard(model=cfg, resize=None), InspectConfig(precision="float32"))
    t = float(np.quantile(probe.inspect(img.astype(np.float32) / 255).opened, 0.9))
    card = ModelCard(model=cfg, resize=None, threshold=t)
    outs = {}
    for name, region in (("whole", 1 << 30), ("banded", 50_000)):
        insp = Inspector(model, card, InspectConfig(precision="float32", region_pixels=region))
        out = str(tmp_path / name)
        record, stats = scan_image(insp, sample, "cut/a", ScanTarget(out, "fp"))
        assert record.bands == (1 if name == "whole" else -(-620 // (50_000 // 410)))
        outs[name] = (out, record.to_dict(), stats)
    (wo, wr, ws), (bo, br, bs) = outs["whole"], outs["banded"]
    for key in ("score", "score_opened", "flagged_pixels", "regions", "height", "width"):
        assert wr[key] == br[key], key
    assert wr["flagged_pixels"] > 0 and wr["regions"] >= 1 and br["tiles"] > wr["tiles"]
    w_urls, b_urls = output_urls(wo, "cut/a"), output_urls(bo, "cut/a")
    assert _bytes(w_urls["mask"]) == _bytes(b_urls["mask"])   # byte-identical PNG
    mask = np.asarray(Image.open(w_urls["mask"])) > 0
    res_w, res_b = tifffile.imread(w_urls["residual"]), tifffile.imread(b_urls["residual"])
    assert res_w.dtype == np.float16 and res_w.shape == img.shape
    np.testing.assert_array_equal(res_w, res_b)
    # the written mask is the method's mask of the written residual's image
    whole = Inspector(model, card, InspectConfig(precision="float32")).inspect(img.astype(np.float32) / 255)
    np.testing.assert_array_equal(mask, whole.mask)
    np.testing.assert_array_equal(res_w, whole.residual.astype(np.float16))
    # per-image statistics: the same histograms either way, and exactly those of the whole maps
    ew, eb = Evaluation.from_bytes(ws), Evaluation.from_bytes(bs)
    for a, b in ((ew.raw, eb.raw), (ew.opened, eb.opened)):
        np.testing.assert_array_equal(a.good, b.good)
        np.testing.assert_array_equal(a.defect, b.defect)
        np.testing.assert_allclose(a.pro, b.pro, rtol=1e-12)
        assert a.regions == b.regions == 2
    from ray_inspect.core.metrics import PixelROC

    ref = PixelROC(ew.raw.bins, ew.raw.range).update(whole.residual, gt)
    np.testing.assert_array_equal(ref.good, ew.raw.good)
    assert ew.scores == [wr["score"]] and ew.labels == [True]
    rec = json.loads(_bytes(w_urls["record"]))
    assert rec == wr and rec["fingerprint"] == "fp" and rec["version"] == "v1"
    assert rec["bytes_read"] == (tmp_path / "src" / "cut" / "a.png").stat().st_size
    assert set(rec["timings"]) == {"read", "inference", "residual", "segment", "write"}


def test_large_residuals_spool_through_a_file(tmp_path, monkeypatch):
    import ray_inspect.steps.imagescan as imagescan

    monkeypatch.setattr(imagescan, "SPOOL_BYTES", 1000)
    img = (np.random.default_rng(1).random((200, 150)) * 255).astype(np.uint8)
    _write_png(tmp_path / "a.png", img)
    cfg = ModelConfig()
    insp = Inspector(build_model(cfg), ModelCard(model=cfg, resize=None), InspectConfig(region_pixels=10_000))
    target = ScanTarget(str(tmp_path / "out"), "fp")
    record, stats = scan_image(insp, Sample(str(tmp_path / "a.png"), "a.png"), "a", target)
    assert stats is None and "flagged_pixels" not in record.to_dict()   # unlabelled, no threshold: no mask
    res = tifffile.imread(output_urls(str(tmp_path / "out"), "a")["residual"])
    assert res.shape == (200, 150) and float(res.max()) == np.float16(record.score)
    assert not list((tmp_path / "out").glob("**/.tmp-*")) and not list((tmp_path / "out").glob("**/*.tmp-*"))


class _Counting:
    """A semaphore that remembers how many held it at once."""

    def __init__(self, n):
        import threading

        self.sem, self.lock = threading.Semaphore(n), threading.Lock()
        self.now, self.most, self.taken = 0, 0, 0

    def __enter__(self):
        self.sem.acquire()
        with self.lock:
            self.now += 1
            self.taken += 1
            self.most = max(self.most, self.now)

    def __exit__(self, *exc):
        with self.lock:
            self.now -= 1
        self.sem.release()


def test_images_scanned_at_once_in_threads_equal_one_at_a_time(tmp_path):
    """Two images computing at once in one process (an actor's slots): same outputs and records as
    sequential scans; large images hold the gate one at a time from decoding to writing."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    rng = np.random.default_rng(4)
    sizes = [(300, 260), (180, 400), (260, 300), (150, 150), (100, 90)]
    samples = []
    for i, (h, w) in enumerate(sizes):
        _write_png(tmp_path / "src" / f"{i}.png", (rng.random((h, w)) * 255).astype(np.uint8))
        samples.append(Sample(str(tmp_path / "src" / f"{i}.png"), f"{i}.png"))
    cfg = ModelConfig()
    card = ModelCard(model=cfg, resize=None, threshold=0.7)
    insp = Inspector(build_model(cfg), card, InspectConfig(precision="float32", region_pixels=60_000))
    run = insp.reconstructor._forward
    ran = []

    def counting(tiles):
        ran.append(len(tiles))
        return run(tiles)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = []
        for i, s in enumerate(samples):
            ran.clear()
            insp.reconstructor._forward = counting
            alone.append(scan_image(insp, s, str(i), ScanTarget(str(tmp_path / "alone"), "fp"))[0].to_dict())
            del insp.reconstructor._forward
            assert alone[-1]["tiles"] == sum(ran) > 0, sizes[i]   # the record counts the windows run
        lock, large = _Counting(2), _Counting(1)
        together_out = ScanTarget(str(tmp_path / "together"), "fp")

        def scan_together(numbered):
            i, s = numbered
            record, _ = scan_image(insp, s, str(i), together_out, compute_slots=lock,
                                   large_image_permits=large)
            return record.to_dict()

        with ThreadPoolExecutor(3) as pool:
            together = list(pool.map(scan_together, enumerate(samples)))
    finally:
        torch.set_num_threads(threads)
    assert large.taken == 3 and large.most == 1           # 300x260, 180x400, 260x300 exceed 60,000 pixels
    assert lock.most == 2 and lock.taken == sum(r["bands"] + 1 for r in alone)   # each band, then the end
    for a, b in zip(alone, together, strict=True):
        for key in ("score", "flagged_pixels", "regions", "tiles", "bands", "height", "width"):
            assert a[key] == b[key], key
        ua = output_urls(str(tmp_path / "alone"), a["stem"])
        ub = output_urls(str(tmp_path / "together"), b["stem"])
        for kind in ("mask", "residual"):
            assert _bytes(ua[kind]) == _bytes(ub[kind]), kind
    # 150 px: windows at 0 and 22; 100 px: padded to one
    assert alone[3]["tiles"] == 4 and alone[4]["tiles"] == 1


def test_a_scaled_large_image_in_bands_writes_the_same_outputs_as_a_whole_one(tmp_path, monkeypatch):
    """A model that scales images by 0.5: banded (the image resized lazily, band by band, and its
    mask upscaled to the stored size in small chunks) equals the whole image resized at once."""
    import ray_inspect.steps.imagescan as imagescan

    rng = np.random.default_rng(1)
    img = (rng.random((403, 317)) * 255).astype(np.uint8)
    img[100:160, 40:200] = 10
    _write_png(tmp_path / "src" / "a.png", img)
    sample = Sample(str(tmp_path / "src" / "a.png"), "a.png", version="v1")
    cfg = ModelConfig()
    model = build_model(cfg)
    card = ModelCard(model=cfg, resize=None, scale=0.5, threshold=0.0)
    probe = Inspector(model, card, InspectConfig(precision="float32"))
    card = ModelCard(model=cfg, resize=None, scale=0.5,
                     threshold=float(np.quantile(probe.inspect(img.astype(np.float32) / 255).opened, 0.8)))
    outs = {}
    for name, region, chunk in (("whole", 1 << 30, 1 << 22), ("banded", 12_000, 3_000)):
        monkeypatch.setattr(imagescan, "MASK_CHUNK_PIXELS", chunk)
        insp = Inspector(model, card, InspectConfig(precision="float32", region_pixels=region))
        assert insp.is_large(403, 317) == (name == "banded")
        out = str(tmp_path / name)
        record, _ = scan_image(insp, sample, "a", ScanTarget(out, "fp"))
        assert record.bands == 1 or name == "banded"
        outs[name] = (output_urls(out, "a"), record.to_dict())
    (wu, wr), (bu, br) = outs["whole"], outs["banded"]
    assert br["bands"] > 1 and wr["flagged_pixels"] > 0
    for key in ("score", "flagged_pixels", "regions", "height", "width"):
        assert wr[key] == br[key], key
    assert _bytes(wu["mask"]) == _bytes(bu["mask"])
    assert np.asarray(Image.open(wu["mask"])).shape == img.shape
    np.testing.assert_array_equal(tifffile.imread(wu["residual"]), tifffile.imread(bu["residual"]))
