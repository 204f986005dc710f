"""The scan on Ray: a pool of actors, each holding the model once, scans a source into OUT.

Output layout under OUT (local or s3://), per image (see ``imagescan``): masks/, residuals/,
stats/images/, records/; for the whole scan:
  errors.jsonl            one line per bad input or lost image: {"key", "url", "reason", "kind"}
  stats/shard-NNNNN.npz   ground-truth statistics of images [N*256, (N+1)*256) of the listing
  metrics.json            pixel AUROC, AU-PRO, image AUROC (with ground truth)
  manifest.json           settings, counts and each image's status
  _SUCCESS                written last
Why plain actors rather than Ray Data: the driver keeps a ledger of every image, so an image
whose actor died is retried elsewhere and counted once, a rerun skips what is complete, and a
large image stays one unit of work that its actor processes band by band in bounded memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from ray_inspect.config import InspectConfig, MetricsConfig, ScanOptions
from ray_inspect.core.evaluation import Evaluation
from ray_inspect.io import storage
from ray_inspect.io.artifact import ModelCard, read_card
from ray_inspect.io.datasets import Sample, list_samples
from ray_inspect.records import InputError
from ray_inspect.steps.imagescan import output_stems, output_urls, scan_image

EXIT_OK, EXIT_PARTIAL = 0, 3
SCAN_FORMAT = 2          # bump when outputs of the same settings change


class NullTelemetry:
    """The telemetry interface the scan reports to; this one records nothing."""

    def start(self, info: dict) -> None: ...
    def actors(self, n: int) -> None: ...
    def in_flight(self, n: int) -> None: ...
    def image(self, record: dict) -> None: ...
    def failed(self, kind: str) -> None: ...
    def finish(self, summary: dict, ok: bool) -> None: ...


def scan_fingerprint(card: ModelCard, cfg: InspectConfig, threshold: float | None, metrics_cfg: MetricsConfig) -> str:
    """Identity of everything that changes an image's outputs; records carry it."""
    key = [SCAN_FORMAT, card.fingerprint, threshold, cfg.stride, cfg.precision, cfg.opening_diameter, cfg.seed,
           metrics_cfg.bins, list(card.score_range)]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]


class ScanActor:
    """One model on one device; ``scan`` runs in a few threads at once, at most ``slots`` of them
    computing (each with ``threads`` threads for torch and OpenCV) while the others read or write."""

    def __init__(self, model_url: str, cfg: InspectConfig, threshold: float | None, out: str,
                 fingerprint: str, metrics_cfg: MetricsConfig, threads: int, slots: int = 1):
        import cv2
        import ray
        import torch

        from ray_inspect.io.artifact import load_model
        from ray_inspect.steps.inspector import Inspector

        torch.set_num_threads(max(1, threads))
        cv2.setNumThreads(max(1, threads))
        device = "cuda" if ray.get_gpu_ids() else "cpu"
        model = load_model(model_url, device)
        self.inspector = Inspector(model, model.card, cfg, threshold, device)
        self.out, self.fingerprint, self.metrics_cfg = out, fingerprint, metrics_cfg
        self.lock = threading.BoundedSemaphore(max(1, slots))       # images computing
        self.large = threading.BoundedSemaphore(max(1, slots))      # images beyond one region in memory

    def pid(self) -> int:
        return os.getpid()

    def scan(self, sample: Sample, stem: str) -> dict:
        try:
            record, stats = scan_image(self.inspector, sample, stem, self.out, self.fingerprint,
                                       self.metrics_cfg, self.lock, self.large)
        except InputError as exc:
            return {"status": "error", "error": {"key": sample.key, "url": exc.url, "reason": exc.reason,
                                                 "kind": exc.kind}}
        return {"status": "ok", "record": record, "stats": stats}


@dataclass
class _Item:
    index: int
    sample: Sample
    stem: str
    attempts: int = 0


@dataclass
class _Ledger:
    """The driver's account of the scan: every image ends here exactly once."""

    samples: list[Sample]
    shard_size: int
    score_range: tuple[float, float]
    metrics_cfg: MetricsConfig
    out: str
    status: dict[int, str] = field(default_factory=dict)        # index -> ok | skipped | error
    stats: dict[int, bytes] = field(default_factory=dict)       # labelled, until their shard is written
    errors: list[dict] = field(default_factory=list)
    tiles: int = 0

    def __post_init__(self):
        self.pending: dict[int, int] = {}                            # shard -> labelled images to go
        for i, s in enumerate(self.samples):
            if s.labelled:
                self.pending[i // self.shard_size] = self.pending.get(i // self.shard_size, 0) + 1
        self._shards: dict[int, Evaluation] = {}

    def done(self, index: int, status: str, stats: bytes | None = None, tiles: int = 0) -> None:
        if index in self.status:
            return                                                  # counted once, whatever happens
        self.status[index] = status
        self.tiles += tiles
        if self.samples[index].labelled:
            if stats is not None:
                self.stats[index] = stats
            shard = index // self.shard_size
            self.pending[shard] -= 1
            if self.pending[shard] == 0:
                self._close_shard(shard)

    def _close_shard(self, shard: int) -> None:
        """Sum the shard's images in listing order (so the floating sums never depend on the
        order images finished in), write it, and add it to the total."""
        ev = Evaluation(self.score_range, self.metrics_cfg)
        lo, hi = shard * self.shard_size, min(len(self.samples), (shard + 1) * self.shard_size)
        for i in range(lo, hi):
            data = self.stats.pop(i, None)
            if data is not None:
                ev += Evaluation.from_bytes(data)
        storage.write_bytes(storage.join(self.out, "stats", f"shard-{shard:05d}.npz"), ev.to_bytes())
        self._shards[shard] = ev

    def evaluation(self) -> Evaluation | None:
        if not self.pending:
            return None
        total = Evaluation(self.score_range, self.metrics_cfg)
        for shard in sorted(self._shards):
            total += self._shards[shard]
        return total


def _complete(out: str, items: list[_Item], fingerprint: str) -> dict[int, dict]:
    """Records of this scan that are already complete (same fingerprint, same input version)."""
    records_root = storage.join(out, "records")
    if not storage.exists(records_root):
        return {}
    present = set(storage.find(records_root))
    todo = [it for it in items if output_urls(out, it.stem)["record"] in present]

    def read(it: _Item):
        try:
            rec = json.loads(storage.read_text(output_urls(out, it.stem)["record"]))
        except (storage.StorageError, ValueError):
            return it.index, None
        ok = rec.get("fingerprint") == fingerprint and rec.get("version") == it.sample.version
        return it.index, rec if ok else None

    with ThreadPoolExecutor(16) as pool:
        return {i: rec for i, rec in pool.map(read, todo) if rec is not None}


def _read_stats(out: str, items: list[_Item]) -> dict[int, bytes | None]:
    """Statistics of complete labelled images (None where they cannot be read: scan it again)."""
    def read(it: _Item):
        try:
            return it.index, storage.read_bytes(output_urls(out, it.stem)["stats"])
        except storage.StorageError:
            return it.index, None

    with ThreadPoolExecutor(16) as pool:
        return dict(pool.map(read, items))


@dataclass(frozen=True)
class _Shape:
    workers: int
    gpus: float          # per actor
    cpus: float          # per actor
    depth: int           # images queued on an actor
    concurrency: int     # images an actor works on at once
    slots: int           # of those, computing at once
    threads: int         # torch and OpenCV threads of a computing image


def _pool_shape(options: ScanOptions, resources: dict) -> _Shape:
    gpus, cpus = float(resources.get("GPU", 0)), float(resources.get("CPU", 1))
    per_gpu = options.gpus_per_worker if options.gpus_per_worker is not None else (1.0 if gpus >= 1 else 0.0)
    if per_gpu > gpus:
        raise ValueError(f"--gpus-per-worker {per_gpu:g} but the cluster has {gpus:g} GPUs")
    workers = options.workers or (int(gpus // per_gpu) if per_gpu else max(1, int(cpus)))
    per_cpu = options.cpus_per_worker or max(1.0, float(int(cpus // workers)))
    # A GPU computes one image at a time. Without one, each CPU computes its own image on one
    # thread: oneDNN's threads wait at every layer's barrier, so N one-thread computations scan
    # faster than one N-thread computation (docs/benchmarks.md). One more image than computes
    # reads or writes meanwhile, so no core waits on storage or on Ray between two images.
    most = 1 if per_gpu else max(1, int(per_cpu))
    concurrency = options.concurrency or most + 1
    slots = min(most, concurrency)
    threads = max(1, int(per_cpu) // slots)
    depth = max(options.depth or concurrency + 1, concurrency)
    return _Shape(workers, per_gpu, per_cpu, depth, concurrency, slots, threads)


def _actor_env(shape: _Shape) -> dict:
    """The actors' environment (merged into the job's). A CPU actor computing one image at a time on
    one thread gets one glibc malloc arena: its images take turns on two threads, and memory freed
    on one thread otherwise stays in that thread's arena while the next image allocates afresh on
    the other (two 16,384² images through one actor: 1.63 GiB peak with per-thread arenas, 1.33
    with one). Actors with several computing threads keep glibc's arena per thread: with one arena
    their threads wait on each other's allocations (two slots: 0.84 -> 0.67 of the bare rate).
    A MALLOC_ARENA_MAX of the user's wins."""
    if shape.gpus or shape.slots * shape.threads > 1 or "MALLOC_ARENA_MAX" in os.environ:
        return {}
    return {"env_vars": {"MALLOC_ARENA_MAX": "1"}}


class _Pool:
    """Actors with at most ``depth`` images each (queued in the actor beyond its concurrency). A dead actor is replaced at once and the images
    it held come back as ``lost``, for the driver to hand to the next free actor."""

    def __init__(self, remote, args: tuple, workers: int, depth: int):
        import ray

        self.ray, self.remote, self.args, self.depth = ray, remote, args, depth
        self.actors = [remote.remote(*args) for _ in range(workers)]
        self.generation = [0] * workers
        self.busy = [0] * workers
        self.inflight: dict = {}                                     # ref -> (actor, generation, item)

    def fill(self, queue: deque) -> None:
        """One image per actor per pass, so a short queue spreads over all actors."""
        while queue:
            free = [a for a in range(len(self.actors)) if self.busy[a] < self.depth]
            if not free:
                return
            for a in free[: len(queue)]:
                item = queue.popleft()
                self.inflight[self.actors[a].scan.remote(item.sample, item.stem)] = (a, self.generation[a], item)
                self.busy[a] += 1

    def results(self, timeout: float = 1.0):
        """Yield (item, "ok" | "lost" | "failed", value) for whatever finished within ``timeout``."""
        ray = self.ray
        ready, _ = ray.wait(list(self.inflight), num_returns=1, timeout=timeout)
        for ref in ready:
            a, gen, item = self.inflight.pop(ref)
            if gen == self.generation[a]:
                self.busy[a] -= 1
            try:
                yield item, "ok", ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                if gen == self.generation[a]:                        # replace a dead actor once
                    ray.kill(self.actors[a], no_restart=True)
                    self.actors[a] = self.remote.remote(*self.args)
                    self.generation[a], self.busy[a] = gen + 1, 0
                yield item, "lost", exc
            except ray.exceptions.RayTaskError as exc:
                yield item, "failed", exc.cause if getattr(exc, "cause", None) is not None else exc

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor, no_restart=True)


def scan(model_url: str, source: str, out: str, cfg: InspectConfig = InspectConfig(),
         threshold: float | None = None, metrics_cfg: MetricsConfig = MetricsConfig(),
         options: ScanOptions = ScanOptions(), telemetry=None,
         progress: Callable[[int, int, str, str], None] | None = None,
         on_error: Callable[[dict], None] | None = None) -> dict:
    """Scan every image of ``source`` into ``out`` on Ray actors; returns the summary (also in
    manifest.json) with ``exit_code``. ``progress(done, total, key, status)`` follows each image."""
    import ray

    from ray_inspect.distributed.cluster import ensure_ray

    t_start = time.time()
    telemetry = telemetry or NullTelemetry()
    model_url, source, out = (storage.absolute(u) for u in (model_url, source, out))
    card = read_card(model_url)
    threshold = card.threshold if threshold is None else threshold
    fingerprint = scan_fingerprint(card, cfg, threshold, metrics_cfg)
    samples = list_samples(source)
    if not samples:
        raise FileNotFoundError(f"{source}: no images (PNG, TIFF, JPEG) found")
    stems = output_stems([s.key for s in samples])
    items = [_Item(i, s, stems[s.key]) for i, s in enumerate(samples)]
    ledger = _Ledger(samples, options.shard_size, card.score_range, metrics_cfg, out)
    storage.remove(storage.join(out, "_SUCCESS"))      # a reused OUT is not "finished" until this run is

    complete = {} if options.force else _complete(out, items, fingerprint)
    stats = _read_stats(out, [it for it in items if it.index in complete and it.sample.labelled])
    complete = {i: rec for i, rec in complete.items() if stats.get(i, b"") is not None}
    for i in complete:
        ledger.done(i, "skipped", stats.get(i))
        if progress:
            progress(len(ledger.status), len(samples), samples[i].key, "skipped")
    queue = deque(it for it in items if it.index not in complete)

    resources = ensure_ray(options.address)
    shape = _pool_shape(options, resources)
    workers, gpus, cpus, depth = min(shape.workers, max(1, len(queue))), shape.gpus, shape.cpus, shape.depth
    telemetry.start({"run_id": fingerprint + "-" + hex(int(t_start))[2:], "model_fingerprint": card.fingerprint,
                     "stride": cfg.stride, "precision": cfg.precision, "workers": workers, "threshold": threshold,
                     "images_total": len(samples), "to_scan": len(queue), "skipped": len(complete)})
    try:
        remote = ray.remote(ScanActor).options(num_cpus=cpus, num_gpus=gpus, max_concurrency=shape.concurrency,
                                               max_restarts=0, runtime_env=_actor_env(shape))
        pool = _Pool(remote, (model_url, cfg, threshold, out, fingerprint, metrics_cfg, shape.threads, shape.slots),
                     workers if queue else 0, depth)
        telemetry.actors(len(pool.actors))
        retried = 0

        def fail(item: _Item, kind: str, reason: str, url: str | None = None) -> None:
            err = {"key": item.sample.key, "url": url or item.sample.url, "reason": reason, "kind": kind}
            ledger.errors.append(err)
            ledger.done(item.index, "error")
            telemetry.failed(kind)
            if on_error:
                on_error(err)
            if progress:
                progress(len(ledger.status), len(samples), item.sample.key, "error")

        while queue or pool.inflight:
            pool.fill(queue)
            telemetry.in_flight(len(pool.inflight))
            for item, outcome, value in pool.results():
                if outcome == "lost":                                # its actor died: try another
                    item.attempts += 1
                    retried += 1
                    if item.attempts < options.max_attempts:
                        queue.appendleft(item)
                    else:
                        fail(item, "worker_died", f"its worker died {item.attempts} times ({type(value).__name__})")
                elif outcome == "failed":
                    kind = "storage" if isinstance(value, storage.StorageError) else "internal"
                    fail(item, kind, (str(value).splitlines() or [type(value).__name__])[0][:300])
                elif value["status"] == "error":
                    e = value["error"]
                    fail(item, e["kind"], e["reason"], e["url"])
                else:
                    ledger.done(item.index, "ok", value["stats"], value["record"]["tiles"])
                    telemetry.image(value["record"])
                    if progress:
                        progress(len(ledger.status), len(samples), item.sample.key, "ok")
        pool.close()
        telemetry.actors(0)
        telemetry.in_flight(0)

        storage.write_text(storage.join(out, "errors.jsonl"), "".join(json.dumps(e) + "\n" for e in ledger.errors))
        counts = {s: sum(1 for v in ledger.status.values() if v == s) for s in ("ok", "skipped", "error")}
        summary = {"model": model_url, "model_fingerprint": card.fingerprint, "scan_fingerprint": fingerprint,
                   "source": source, "out": out, "images": len(samples), "scanned": counts["ok"],
                   "skipped": counts["skipped"], "failed": counts["error"], "retried": retried,
                   "tiles": ledger.tiles, "workers": workers, "gpus_per_worker": gpus, "cpus_per_worker": cpus,
                   "depth": depth, "concurrency": shape.concurrency, "compute_slots": shape.slots,
                   "threads_per_slot": shape.threads,
                   "threshold": threshold, "stride": cfg.stride, "precision": cfg.precision,
                   "seconds": round(time.time() - t_start, 3)}
        evaluation = ledger.evaluation()
        if evaluation is not None and evaluation.images:
            summary["metrics"] = evaluation.metrics()
            storage.write_bytes(storage.join(out, "stats", "roc.npz"), evaluation.raw.to_bytes())
            storage.write_bytes(storage.join(out, "stats", "roc_opened.npz"), evaluation.opened.to_bytes())
            storage.write_text(storage.join(out, "metrics.json"), json.dumps(summary["metrics"], indent=2))
        entries = [{"key": s.key, "stem": stems[s.key], "status": ledger.status.get(i, "missing")}
                   for i, s in enumerate(samples)]
        storage.write_text(storage.join(out, "manifest.json"), json.dumps({**summary, "entries": entries}, indent=2))
        storage.write_text(storage.join(out, "_SUCCESS"), "")
        summary["exit_code"] = EXIT_PARTIAL if ledger.errors else EXIT_OK
    except BaseException:
        telemetry.finish({"images": len(samples), "scanned": sum(1 for v in ledger.status.values() if v == "ok"),
                          "failed": len(ledger.errors), "seconds": round(time.time() - t_start, 3)}, ok=False)
        raise
    telemetry.finish(summary, ok=True)
    return summary
