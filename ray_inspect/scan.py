"""Single-process scan: list a source, run the per-image step, write masks, residuals and metrics.

Output layout under OUT (local or s3://):
  masks/<key>.png           1-bit defect mask, same path as the input (needs a threshold)
  residuals/<key>.tiff      float16 residual map at processing resolution
  records/<key>.json        per-image record (status, score, flagged pixels, regions, timings)
  errors.jsonl              one line per bad input: {"key", "url", "reason", "kind"}
  stats/roc.npz, stats/roc_opened.npz   mergeable pixel ROC/PRO histograms (with ground truth)
  metrics.json              pixel AUROC, AU-PRO, image AUROC (with ground truth)
  manifest.json, _SUCCESS   settings and counts; _SUCCESS is written last
"""

from __future__ import annotations

import itertools
import os
import json
import posixpath
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import numpy as np

from . import storage
from .artifact import load_model
from .config import InspectConfig, MetricsConfig
from .datasets import Sample, list_samples
from .images import InputError, encode_png, encode_tiff
from .metrics import PixelROC, image_auroc
from .pipeline import ImageResult, Inspector

EXIT_OK, EXIT_PARTIAL = 0, 3
PREFETCH, MAX_PENDING, IO_THREADS = 2, 4, int(os.environ.get("RAY_INSPECT_IO_THREADS", "1"))


def output_key(key: str, ext: str) -> str:
    return posixpath.splitext(key)[0] + ext


class Evaluation:
    """Accumulates ground-truth statistics: raw and opened pixel ROC/PRO, image scores."""

    def __init__(self, score_range: tuple[float, float], cfg: MetricsConfig = MetricsConfig()):
        self.cfg = cfg
        self.raw = PixelROC(cfg.bins, score_range)
        self.opened = PixelROC(cfg.bins, score_range)
        self.image_scores: list[float] = []
        self.image_labels: list[bool] = []

    def add(self, result: ImageResult, gt: np.ndarray, defective: bool) -> None:
        """``defective`` comes from the sample: a tiny defect may vanish from the downscaled mask."""
        self.raw.update(result.residual, gt)
        self.opened.update(result.opened, gt)
        self.image_scores.append(result.score)
        self.image_labels.append(defective)

    def metrics(self) -> dict:
        out: dict = {"images": len(self.image_scores), "defective": int(sum(self.image_labels)),
                     "fpr_limit": self.cfg.fpr_limit, "bins": self.cfg.bins}
        for name, roc in (("", self.raw), ("_opened", self.opened)):
            if roc.defect.sum() and roc.good.sum():
                out["pixel_auroc" + name] = roc.auroc()
                out["au_pro" + name] = roc.au_pro(self.cfg.fpr_limit)
        if 0 < sum(self.image_labels) < len(self.image_labels):
            out["image_auroc"] = image_auroc(self.image_scores, self.image_labels)
        return out


def write_result(out: str, result: ImageResult, extra: dict) -> None:
    """Mask, residual, then the record (the record's presence means the image is complete)."""
    if result.mask is not None:
        storage.write_bytes(storage.join(out, "masks", output_key(result.key, ".png")),
                            encode_png(result.mask))  # 1-bit PNG: 7x smaller, 3x faster to encode
    storage.write_bytes(storage.join(out, "residuals", output_key(result.key, ".tiff")),
                        encode_tiff(result.residual.astype(np.float16)))
    record = {**result.record(), **extra}
    storage.write_text(storage.join(out, "records", output_key(result.key, ".json")), json.dumps(record))


class _Inline:
    """A stand-in for a thread pool that runs each job at once (IO_THREADS = 0)."""

    def submit(self, fn, *args):
        fut: Future = Future()
        try:
            fut.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - delivered through the future, like a pool
            fut.set_exception(exc)
        return fut

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _finish(inspector: Inspector, out: str, key: str, residual: np.ndarray, tiles: int, timings: dict,
            extra: dict, gt: np.ndarray | None, evaluation: Evaluation | None, lock: threading.Lock) -> None:
    """Segment, write and account one image (runs on the I/O thread, beside the next forward)."""
    result = inspector.segment(key, residual, tiles, timings, grey=gt is not None)
    write_result(out, result, extra)
    if evaluation is not None and gt is not None:
        with lock:
            evaluation.add(result, gt, extra["defect_type"] not in (None, "good"))


def _load(inspector: Inspector, sample: Sample):
    """Read and decode one sample (runs on the I/O thread); errors are returned, not raised."""
    t0 = time.perf_counter()
    try:
        image, gt = inspector.load(sample)
    except InputError as exc:
        return sample, None, None, 0.0, exc
    return sample, image, gt, time.perf_counter() - t0, None


def scan(model_url: str, source: str, out: str, cfg: InspectConfig = InspectConfig(),
         threshold: float | None = None, metrics_cfg: MetricsConfig = MetricsConfig(),
         progress: Callable[[str], None] | None = None, on_error: Callable[[dict], None] | None = None) -> dict:
    """Scan every image of ``source`` into ``out``; returns the summary (also in manifest.json)."""
    t_start = time.time()
    model = load_model(model_url)
    card = model.card
    inspector = Inspector(model, card, cfg, threshold)
    samples = list_samples(source)
    if not samples:
        raise FileNotFoundError(f"{source}: no images (PNG, TIFF, JPEG) found")
    evaluation = Evaluation(card.score_range, metrics_cfg) if any(s.labelled for s in samples) else None
    storage.remove(storage.join(out, "_SUCCESS"))  # a reused OUT is not "finished" until this run is
    errors: list[dict] = []
    done = 0
    # The model runs on this thread; reads (decode), segmentation and writes (encode, upload) run
    # beside it on a small pool: at most PREFETCH images are decoded ahead and MAX_PENDING
    # results wait to be finished.
    pool_cm = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="ray-inspect-io") if IO_THREADS else _Inline()
    with pool_cm as pool:
        todo = iter(samples)
        loads: deque = deque(pool.submit(_load, inspector, s) for s in itertools.islice(todo, PREFETCH))
        writes: deque = deque()
        lock = threading.Lock()
        while loads:
            sample, image, gt, t_read, exc = loads.popleft().result()
            nxt = next(todo, None)
            if nxt is not None:
                loads.append(pool.submit(_load, inspector, nxt))
            if exc is not None:
                err = {"key": sample.key, "url": exc.url, "reason": exc.reason, "kind": exc.kind}
                errors.append(err)
                if on_error:
                    on_error(err)
            else:
                residual, tiles, timings = inspector.residual_map(image, sample.key)
                extra = {"url": sample.url, "defect_type": sample.defect_type, "mask_url": sample.mask_url}
                writes.append(pool.submit(_finish, inspector, out, sample.key, residual, tiles,
                                          {"read": t_read, **timings}, extra, gt, evaluation, lock))
                while len(writes) > MAX_PENDING:
                    writes.popleft().result()
                done += 1
            if progress:
                progress(sample.key)
        for w in writes:
            w.result()
    storage.write_text(storage.join(out, "errors.jsonl"), "".join(json.dumps(e) + "\n" for e in errors))
    summary = {"model": model_url, "model_fingerprint": card.fingerprint, "source": source, "out": out,
               "images": len(samples), "scanned": done, "failed": len(errors),
               "threshold": inspector.threshold, "stride": cfg.stride, "precision": cfg.precision,
               "seconds": round(time.time() - t_start, 3)}
    if evaluation is not None and evaluation.image_scores:
        storage.write_bytes(storage.join(out, "stats", "roc.npz"), evaluation.raw.to_bytes())
        storage.write_bytes(storage.join(out, "stats", "roc_opened.npz"), evaluation.opened.to_bytes())
        summary["metrics"] = evaluation.metrics()
        storage.write_text(storage.join(out, "metrics.json"), json.dumps(summary["metrics"], indent=2))
    storage.write_text(storage.join(out, "manifest.json"), json.dumps(summary, indent=2))
    storage.write_text(storage.join(out, "_SUCCESS"), "")
    summary["exit_code"] = EXIT_PARTIAL if errors else EXIT_OK
    return summary
