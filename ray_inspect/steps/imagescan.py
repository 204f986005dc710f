"""Scan one image into OUT: read it, run the method band by band, write its outputs, record last.

Outputs of an image whose output stem is S (its path below the source, without the extension):
  masks/S.png          1-bit defect mask at the image's stored size (when there is a threshold)
  residuals/S.tiff     float16 residual map at processing resolution, one TIFF strip per band
  stats/images/S.npz   its ground-truth statistics (labelled images only), see ``Evaluation``
  records/S.json       the record, written last: present with the scan's fingerprint and the
                       input's version, it marks the image complete
Every object is written atomically, so a killed scan leaves whole files or none. No Ray here: the
scan actors call ``scan_image``, and so can a test or a notebook.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import io
import os
import posixpath
import resource
import socket
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import tifffile
import torch
from PIL import Image
from skimage.measure import label

from ray_inspect.config import MetricsConfig
from ray_inspect.core.evaluation import Evaluation
from ray_inspect.core.segmentation import RegionCounter, upscale_mask_rows
from ray_inspect.io import storage
from ray_inspect.io.datasets import Sample
from ray_inspect.io.images import check_bytes, fetch, peek_shape
from ray_inspect.records import ImageRecord, Outcome
from ray_inspect.steps.inspector import BandResult, Inspector, LoadedImage

T = TypeVar("T")
SPOOL_BYTES = 64 << 20   # residual maps larger than this go through a local temporary file


# Each output of an image: its folder below OUT and the suffix added to the image's stem.
OUTPUTS = {"mask": ("masks", ".png"), "residual": ("residuals", ".tiff"),
           "stats": ("stats/images", ".npz"), "record": ("records", ".json")}


def _folders(stems) -> set[str]:
    """Every folder the outputs of these stems are written in (``a/b/c`` -> ``a/b``, ``a``)."""
    seen: set[str] = set()
    for s in stems:
        d = s.rpartition("/")[0]
        while d and d not in seen:
            seen.add(d)
            d = d.rpartition("/")[0]
    return seen


def output_stems(keys: list[str]) -> dict[str, str]:
    """Output path of each input below OUT: its key without the extension, or the whole key where
    that would collide with another input's output (a.png, a.tiff; a.png beside a.png.tiff) or
    folder (a.png beside a.png/x.png), made safe by ``storage.safe_path`` (no segment that leaves
    OUT). Keys are distinct, so the result is too."""
    final = {k: posixpath.splitext(k)[0] for k in keys}
    while True:
        count = Counter(final.values())
        folders = _folders(final.values())
        clashing = [k for k, s in final.items() if s != k and
                    (count[s] > 1 or any(s + suffix in folders for _, suffix in OUTPUTS.values()))]
        if not clashing:
            return {k: storage.safe_path(s) for k, s in final.items()}
        for k in clashing:          # a stem gives way to its whole key; that only ever happens once
            final[k] = k


STEM_WINDOW = 256        # keys before and after each key that ``streamed_stems`` compares it with


def streamed_stems(items: Iterable[T], key: Callable[[T], str], window: int = STEM_WINDOW,
                   on_unsorted: Callable[[int], None] | None = None) -> Iterator[tuple[T, str]]:
    """``output_stems`` of a listing that arrives as a stream, holding ``window`` keys on either
    side of each. Only keys that share a key's root can clash with it; in a listing in key order
    they sit next to it, and ``output_stems`` of those neighbours decides. Keys that come out of
    order (a file of keys) cannot be compared with all that may clash with them: from the first one
    on (``on_unsorted(its position)``), every key's stem is its whole key."""
    seen = deque()                     # keys in arrival order: the window behind, the key, and ahead
    ordered: list[str] = []            # the same keys, sorted
    pending: deque = deque()           # items not yet yielded, with their keys
    dropped = exhausted = False
    unsorted_from, last, position = None, None, 0
    source = iter(items)
    while True:
        while not exhausted and len(pending) <= window:
            item = next(source, _END)
            if item is _END:
                exhausted = True
                break
            k = key(item)
            if unsorted_from is None and last is not None and k < last:
                unsorted_from = position + len(pending)
                if on_unsorted is not None:
                    on_unsorted(unsorted_from)
            last = k
            pending.append((item, k))
            seen.append(k)
            bisect.insort(ordered, k)
        if not pending:
            return
        item, k = pending.popleft()
        if unsorted_from is not None and position >= unsorted_from - window:
            yield item, storage.safe_path(k)
        else:
            yield item, _stem_among(k, ordered, window, open_below=dropped, open_above=not exhausted)
        position += 1
        while len(seen) - len(pending) > window:         # forget keys beyond the window behind
            old = seen.popleft()
            del ordered[bisect.bisect_left(ordered, old)]
            dropped = True


_END = object()


def _stem_among(k: str, ordered: list[str], window: int, open_below: bool, open_above: bool) -> str:
    """``k``'s stem, from the keys of the window that can clash with it: those that start with
    its stem and a dot (the same stem with another extension, or a folder named like one of its
    outputs), and, where its stem is itself a key (``a.png`` beside ``a.png.tiff``), that key's.
    Every key of a group larger than ``window`` gives way (each of them sees that it is, or that
    the group runs past the window), so that all of them decide alike."""
    root = posixpath.splitext(k)[0]
    while _holds(ordered, root) and posixpath.splitext(root)[0] != root:
        root = posixpath.splitext(root)[0]
    lo, hi = bisect.bisect_left(ordered, root + "."), bisect.bisect_left(ordered, root + ".\U0010ffff")
    if (lo == 0 and open_below) or (hi == len(ordered) and open_above) or hi - lo > window:
        return storage.safe_path(k)
    if hi - lo <= 1:
        return storage.safe_path(posixpath.splitext(k)[0])
    return output_stems(ordered[lo:hi])[k]


def _holds(ordered: list[str], key: str) -> bool:
    i = bisect.bisect_left(ordered, key)
    return i < len(ordered) and ordered[i] == key


def output_urls(out: str, stem: str) -> dict[str, str]:
    return {name: storage.join(out, folder, stem + suffix) for name, (folder, suffix) in OUTPUTS.items()}


MASK_CHUNK_PIXELS = 1 << 22       # a band's mask is upscaled to the stored size this many pixels at a time


class _Accumulator:
    """What one image's bands add up to: packed mask rows, score, regions, statistics, timings."""

    def __init__(self, inspector: Inspector, img: LoadedImage, metrics_cfg: MetricsConfig):
        gt = img.gt
        self.shape, self.source_shape = img.pixels.shape[:2], img.source_shape
        self.packed: list[np.ndarray] = []
        self.regions = RegionCounter()
        self.score = self.score_opened = -np.inf
        self.flagged = self.tiles = self.bands = 0
        self.timings: Counter = Counter()
        self.gt = gt
        self.evaluation = None
        if gt is not None:
            self.evaluation = Evaluation(inspector.card.score_range, metrics_cfg)
            self.labels = label(gt, connectivity=2)
            self.sizes = np.bincount(self.labels.ravel())

    def add(self, band: BandResult) -> None:
        r0, r1 = band.rows
        self.score = max(self.score, float(band.residual.max()))
        if band.mask is not None:
            for rows in self._mask_chunks(r0, r1):
                mask = upscale_mask_rows(band.mask[rows[0] - r0 : rows[1] - r0], rows, self.shape,
                                         self.source_shape)
                if len(mask):
                    self.packed.append(np.packbits(mask, axis=1))
                    self.flagged += int(mask.sum())
                    self.regions.add(mask)
        if self.evaluation is not None:
            self.score_opened = max(self.score_opened, float(band.opened.max()))
            self.evaluation.add_rows(band.residual, band.opened, self.gt[r0:r1], self.labels[r0:r1],
                                     self.sizes)
        self.tiles += band.tiles
        self.bands += 1
        self.timings.update(band.timings)

    def _mask_chunks(self, r0: int, r1: int) -> list[tuple[int, int]]:
        """Rows [r0, r1) in chunks whose mask at the stored size is about 4 Mpx, so that a model that
        scales images down does not upscale (and label) a whole band's mask at once."""
        source_pixels_per_row = self.source_shape[0] * self.source_shape[1] / max(1, self.shape[0])
        step = max(1, int(MASK_CHUNK_PIXELS // max(1.0, source_pixels_per_row)))
        return [(i, min(r1, i + step)) for i in range(r0, r1, step)]

    def statistics(self, defective: bool) -> bytes | None:
        """The image's ground-truth statistics, once all its bands are in (None: unlabelled)."""
        if self.evaluation is None:
            return None
        self.evaluation.add_image(self.score, defective, int(self.sizes.size - 1))
        return self.evaluation.to_bytes()


def _encode_mask(packed: list[np.ndarray], height: int, width: int) -> bytes:
    """The mask as a 1-bit PNG: smaller and quicker to encode than an 8-bit one."""
    buf = io.BytesIO()
    Image.frombytes("1", (width, height), b"".join(p.tobytes() for p in packed)).save(
        buf, format="PNG", compress_level=1)
    return buf.getvalue()


@dataclass(frozen=True)
class ScanTarget:
    """Where a scan writes its images' outputs and what they are computed under: OUT, the scan's
    fingerprint (every record carries it) and the histogram settings of the statistics."""

    out: str
    fingerprint: str
    metrics_cfg: MetricsConfig = MetricsConfig()


def scan_image(inspector: Inspector, sample: Sample, stem: str, target: ScanTarget,
               compute_slots=None, large_image_permits=None) -> tuple[ImageRecord, bytes | None]:
    """Scan ``sample`` into ``target.out``; returns its record and its statistics (labelled images).

    Several images may share one model: ``compute_slots`` (a lock or semaphore) is held around each
    band's computation, so reads, encoding and writes of one overlap the computation of another;
    ``large_image_permits`` (likewise) is held by an image beyond one region from its decoding to
    its last write, so that large images do not add up in memory. Bad input raises InputError.
    """
    t0 = time.perf_counter()
    check_bytes(sample.listed_bytes, sample.url, inspector.cfg.max_pixels)
    data = fetch(sample.url)
    shape = peek_shape(data, sample.url)
    big = shape is not None and inspector.is_large(*shape)
    permit = large_image_permits if big and large_image_permits is not None else contextlib.nullcontext()
    with permit:
        try:
            img = inspector.read(sample, data)
            del data
            return _scan(inspector, sample, img, stem, target, compute_slots, time.perf_counter() - t0)
        finally:
            if big:
                img = None
                _trim_heap()


def _trim_heap() -> None:
    """Return the allocator's free memory to the system after a large image, so that an actor does
    not keep that image's peak resident while it goes on with others."""
    with contextlib.suppress(OSError, AttributeError):      # not glibc
        ctypes.CDLL(None).malloc_trim(0)


def _scan(inspector: Inspector, sample: Sample, img: LoadedImage, stem: str, target: ScanTarget,
          compute_slots, t_read: float) -> tuple[ImageRecord, bytes | None]:
    h, w = img.pixels.shape[:2]
    acc = _Accumulator(inspector, img, target.metrics_cfg)
    bands = inspector.bands(img.pixels, sample.key, keep_opened=img.gt is not None)
    urls = output_urls(target.out, stem)
    with _ResidualFile(h * w * 2 > SPOOL_BYTES) as residual:
        tifffile.imwrite(residual.target, data=_strips(bands, acc, compute_slots or contextlib.nullcontext()),
                         shape=(h, w), dtype="<f2", photometric="minisblack",
                         rowsperstrip=inspector.band_rows(h, w))
        t1 = time.perf_counter()
        written = 0
        if acc.packed:
            mask = _encode_mask(acc.packed, *acc.source_shape)
            storage.write_bytes(urls["mask"], mask)
            written += len(mask)
        written += residual.upload(urls["residual"])
    stats = acc.statistics(sample.defective)
    if stats is not None:
        storage.write_bytes(urls["stats"], stats)
        written += len(stats)
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024     # the process's peak so far
    timings = {"read": t_read, **acc.timings, "write": time.perf_counter() - t1}
    record = ImageRecord(
        key=sample.key, stem=stem, url=sample.url, version=sample.version, status=Outcome.OK,
        fingerprint=target.fingerprint, defect_type=sample.defect_type, mask_url=sample.mask_url,
        score=acc.score, height=h, width=w, tiles=acc.tiles, bands=acc.bands,
        threshold=inspector.threshold, bytes_read=img.nbytes, max_rss_bytes=max_rss,
        score_opened=acc.score_opened if acc.evaluation is not None else None,
        flagged_pixels=acc.flagged if acc.packed else None,
        regions=acc.regions.count if acc.packed else None,
        bytes_written=written, timings={k: round(v, 6) for k, v in timings.items()},
        worker=f"{socket.gethostname()}:{os.getpid()}", finished=round(time.time(), 6))
    storage.write_text(urls["record"], record.to_json())   # last: the image is now complete
    return record, stats


def _strips(bands: Iterator[BandResult], acc: _Accumulator, compute_slots) -> Iterator[bytes]:
    """The residual map's TIFF strips, one per band, each band computed holding a compute slot."""
    while True:
        with compute_slots:
            band = next(bands, None)
        if band is None:
            return
        acc.add(band)
        # float16 through torch: quicker than numpy's astype
        yield torch.from_numpy(band.residual).half().numpy().astype("<f2", copy=False).tobytes()


class _ResidualFile:
    """Where the residual TIFF is written: memory, or a local temporary file when it is large."""

    def __init__(self, spool: bool):
        self._dir = tempfile.TemporaryDirectory(prefix="ray-inspect-") if spool else None
        self.target = os.path.join(self._dir.name, "residual.tiff") if self._dir else io.BytesIO()

    def __enter__(self) -> _ResidualFile:
        return self

    def __exit__(self, *exc) -> None:
        if self._dir is not None:
            self._dir.cleanup()

    def upload(self, url: str) -> int:
        """Write the TIFF to ``url``; returns its size."""
        if self._dir is not None:
            storage.put_file(url, self.target)
            return os.path.getsize(self.target)
        storage.write_bytes(url, self.target.getvalue())
        return self.target.getbuffer().nbytes
