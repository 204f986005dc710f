"""The scan on Ray: a pool of actors, each holding the model once, scans a source into OUT.

The source is listed page by page (or read from a file of keys) and fed to the actors as it
arrives; the driver holds the images in flight and a window of the listing, never the listing.
Output layout under OUT (local or s3://), per image (see ``imagescan``): masks/, residuals/,
stats/images/, records/; per shard of the listing (images [N*1000, (N+1)*1000)), written as the
shard ends:
  stats/shard-NNNNN.npz             ground-truth statistics of the shard's labelled images
  manifest/entries-NNNNN.jsonl      each image's key, output stem and status
  ledger/<fingerprint>/*.jsonl      the images completed (key, version, stem): what a rerun skips
and for the whole scan:
  errors.jsonl            one line per bad input or lost image: {"key", "url", "reason", "kind"}
  metrics.json            pixel AUROC, AU-PRO, image AUROC (with ground truth)
  manifest.json           settings and counts
  _LEASE                  while a scan runs: who (see ``io.lease``)
  _SUCCESS                written last
Why plain actors rather than Ray Data: the driver keeps an account of every image, so an image
whose actor died is retried elsewhere and counted once, a rerun skips what is complete, and a
large image stays one unit of work that its actor processes band by band in bounded memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, TypedDict, Unpack

from ray_inspect.config import DEVICE_ENV, InspectConfig, MetricsConfig, ScanOptions
from ray_inspect.core.evaluation import Evaluation
from ray_inspect.distributed.cluster import ResourcesUnavailable, offer
from ray_inspect.io import storage
from ray_inspect.io.artifact import ModelCard, load_model
from ray_inspect.io.datasets import Sample, iter_samples
from ray_inspect.io.images import IMAGE_FORMATS
from ray_inspect.io.keys import keyed_samples, read_keys
from ray_inspect.io.lease import Lease, LeaseHeld
from ray_inspect.io.ledger import Ledger
from ray_inspect.records import (
    FailureKind,
    ImageRecord,
    InputError,
    Outcome,
    RunFailure,
    ScanError,
    ScanProgress,
)
from ray_inspect.steps.imagescan import ScanTarget, output_urls, scan_image, streamed_stems
from ray_inspect.telemetry import NULL_SCAN, ScanRecorder

log = logging.getLogger(__name__)

EXIT_OK, EXIT_PARTIAL = 0, 3
SCAN_FORMAT = 3          # bump when outputs of the same settings change
WINDOW = 1024            # images of the listing read ahead of the actors, at least
LISTED_EVERY = 1000      # images listed between two updates of the listing's metrics
MANIFEST_DIR = "manifest"

Progress = Callable[[ScanProgress], None]


class ScanHooks(TypedDict, total=False):
    """Who hears of a scan as it runs (keyword arguments of ``scan``, each optional)."""

    telemetry: ScanRecorder | None               # metrics and logs of the run (default: none)
    progress: Progress | None                    # a ScanProgress after each image
    on_error: Callable[[ScanError], None] | None  # each image not scanned, as errors.jsonl records it


def scan_fingerprint(card: ModelCard, cfg: InspectConfig, threshold: float | None,
                     metrics_cfg: MetricsConfig) -> str:
    """Identity of everything that changes an image's outputs; records carry it."""
    key = [SCAN_FORMAT, card.fingerprint, threshold, cfg.stride, cfg.precision, cfg.opening_diameter,
           cfg.seed, metrics_cfg.bins, list(card.score_range)]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ScanResult:
    """How one image's scan on an actor ended: OK with its record (and statistics, when labelled),
    or ERROR with what was wrong with the input."""

    outcome: Outcome
    record: ImageRecord | None = None
    stats: bytes | None = None
    error: ScanError | None = None
    retries: int = 0                 # storage requests retried for this image
    hung: bool = False               # still running past --image-timeout: its actor must go


class ScanActor:
    """One model on one device; ``scan`` runs in a few threads at once, at most ``slots`` of them
    computing (each with ``threads`` threads for torch and OpenCV) while the others read or write."""

    def __init__(self, model_url: str, card: ModelCard, cfg: InspectConfig, threshold: float | None,  # noqa: PLR0913 - the plan's parts an actor needs
                 target: ScanTarget, threads: int, slots: int = 1):
        import cv2
        import ray
        import torch

        from ray_inspect.steps.inspector import Inspector

        torch.set_num_threads(max(1, threads))
        cv2.setNumThreads(max(1, threads))
        device = "cuda" if ray.get_gpu_ids() and os.environ.get(DEVICE_ENV, "").lower() != "cpu" else "cpu"
        model = load_model(model_url, device, card)   # the driver's card: the weights it checked
        self.inspector = Inspector(model, model.card, cfg, threshold, device, stats=model.normaliser)
        self.target = target
        self.compute_slots = threading.BoundedSemaphore(max(1, slots))          # images computing
        self.large_image_permits = threading.BoundedSemaphore(max(1, slots))    # images beyond one region

    def pid(self) -> int:
        return os.getpid()

    def scan(self, sample: Sample, stem: str, timeout: float | None = None) -> ScanResult:
        """One image; past ``timeout`` seconds an ERROR of kind TIMEOUT marked ``hung``: the thread
        that scans it cannot be stopped, so the driver replaces this actor."""
        if timeout is None:
            return self._scan(sample, stem)
        box: dict = {}

        def run() -> None:
            try:
                box["result"] = self._scan(sample, stem)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread as it is
                box["error"] = exc

        worker = threading.Thread(target=run, name=f"scan {stem}", daemon=True)
        worker.start()
        worker.join(timeout)
        if worker.is_alive():
            error = ScanError(sample.key, sample.url, f"not scanned within {timeout:g} s (--image-timeout)",
                              FailureKind.TIMEOUT)
            return ScanResult(Outcome.ERROR, error=error, hung=True)
        if "error" in box:
            raise box["error"]
        return box["result"]

    def _scan(self, sample: Sample, stem: str) -> ScanResult:
        """One image (in its own thread, which counts the storage retries it makes)."""
        before = storage.thread_retries()
        try:
            record, stats = scan_image(self.inspector, sample, stem, self.target, self.compute_slots,
                                       self.large_image_permits)
            result = ScanResult(Outcome.OK, record, stats)
        except InputError as exc:
            result = ScanResult(Outcome.ERROR, error=ScanError(sample.key, exc.url, exc.reason, exc.kind))
        except storage.StorageError as exc:         # the store stayed unreachable past the retry policy
            result = ScanResult(Outcome.ERROR, error=_scan_error(sample, exc))
        return replace(result, retries=storage.thread_retries() - before)


@dataclass
class _Item:
    index: int             # position in the listing
    sample: Sample
    stem: str
    attempts: int = 0


@dataclass
class _Shard:
    """Images [n * shard_size, (n + 1) * shard_size) of the listing, held while any is open."""

    entries: dict[int, list] = field(default_factory=dict)   # index -> [key, stem, version, status]
    stats: dict[int, bytes] = field(default_factory=dict)    # labelled images' statistics
    labelled: int = 0
    open: int = 0                                            # listed and not yet ended
    recovered: set[int] = field(default_factory=set)         # complete by a record, not in the ledger


class _Tally:
    """The driver's account of the scan: every listed image ends here exactly once. Only shards
    with images still open are held. A shard that ended (and that the listing has passed) writes
    its statistics (labelled images), its lines of the manifest and its ledger object, and
    leaves memory: what the driver holds does not grow with the source."""

    def __init__(self, out: str, shard_size: int, score_range: tuple[float, float],  # noqa: PLR0913 - where, how big, and the statistics' settings
                 metrics_cfg: MetricsConfig, ledger: Ledger):
        self.out, self.shard_size, self.ledger = out, shard_size, ledger
        self.score_range, self.metrics_cfg = score_range, metrics_cfg
        self.shards: dict[int, _Shard] = {}
        self.listed = 0
        self.listing_done = False
        self.counts: Counter = Counter()         # outcome -> images
        self.tiles = 0
        self.errors: list[ScanError] = []
        self._closed: dict[int, Evaluation | None] = {}
        self._merged = 0                          # shards before this one are summed into ``total``
        self.total: Evaluation | None = None

    def list(self, item: _Item) -> None:
        """The listing reached ``item`` (in order); the shard it leaves behind may close."""
        n = item.index // self.shard_size
        shard = self.shards.setdefault(n, _Shard())
        shard.entries[item.index] = [item.sample.key, item.stem, item.sample.version, None]
        shard.open += 1
        shard.labelled += item.sample.labelled
        self.listed = item.index + 1
        if item.index % self.shard_size == 0 and n - 1 in self.shards:
            self._close_if_done(n - 1)

    def finish_listing(self) -> None:
        self.listing_done = True
        for n in sorted(self.shards):
            self._close_if_done(n)

    def done(self, index: int, status: Outcome, stats: bytes | None = None, tiles: int = 0) -> None:
        n = index // self.shard_size
        shard = self.shards.get(n)
        if shard is None or shard.entries[index][3] is not None:
            return                                                  # counted once, whatever happens
        shard.entries[index][3] = status
        shard.open -= 1
        self.counts[status] += 1
        self.tiles += tiles
        if stats is not None:
            shard.stats[index] = stats
        self._close_if_done(n)

    def recovered(self, index: int) -> None:
        """The image is complete by its record, not in the ledger yet: its shard adds it."""
        self.shards[index // self.shard_size].recovered.add(index)

    def flush(self) -> None:
        """Into the ledger: the complete images of shards still open (the scan is stopping)."""
        for shard in self.shards.values():
            self.ledger.append(self._ledgered(shard, sorted(shard.entries)))
            shard.recovered.clear()

    @staticmethod
    def _ledgered(shard: _Shard, indices: list[int]) -> list[tuple[str, str, str]]:
        return [(e[0], e[2], e[1]) for i in indices for e in (shard.entries[i],)
                if e[3] is Outcome.OK or i in shard.recovered]

    def ended(self) -> int:
        return sum(self.counts.values())

    def _close_if_done(self, n: int) -> None:
        shard = self.shards[n]
        if shard.open == 0 and (self.listing_done or self.listed >= (n + 1) * self.shard_size):
            self._close(n, self.shards.pop(n))

    def _close(self, n: int, shard: _Shard) -> None:
        """Write the shard's statistics (summed in listing order, so the floating sums never depend
        on the order images finished in), manifest lines and ledger object."""
        entries = [shard.entries[i] for i in sorted(shard.entries)]
        evaluation = None
        if shard.labelled:
            evaluation = Evaluation(self.score_range, self.metrics_cfg)
            for i in sorted(shard.stats):
                evaluation += Evaluation.from_bytes(shard.stats[i])
            storage.write_bytes(storage.join(self.out, "stats", f"shard-{n:05d}.npz"), evaluation.to_bytes())
        lines = "".join(json.dumps({"key": k, "stem": stem, "status": status}) + "\n"
                        for k, stem, _, status in entries)
        storage.write_text(storage.join(self.out, MANIFEST_DIR, f"entries-{n:05d}.jsonl"), lines)
        self.ledger.append(self._ledgered(shard, sorted(shard.entries)))
        self._closed[n] = evaluation
        while self._merged in self._closed:                        # the total, in shard order
            part = self._closed.pop(self._merged)
            if part is not None:
                if self.total is None:
                    self.total = Evaluation(self.score_range, self.metrics_cfg)
                self.total += part
            self._merged += 1

    def evaluation(self) -> Evaluation | None:
        """The statistics of every labelled image (None when there were none)."""
        return self.total


def manifest_entries(out: str) -> Iterator[dict]:
    """The manifest's line of every image of a scan in OUT, in listing order: key, stem, status."""
    folder = storage.join(out, MANIFEST_DIR)
    if not storage.exists(folder):
        return
    for url, _ in storage.iter_versions(folder):
        if url.endswith(".jsonl"):
            for line in storage.read_text(url).splitlines():
                yield json.loads(line)


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
    """The actors to ask for: what the options say, the rest from the cluster as it is now. GPUs
    that are not up yet (an autoscaler adds them for the actors' requests) are not an error; GPU
    actors then ask for one CPU each unless --cpus-per-worker says otherwise."""
    gpus, cpus = float(resources.get("GPU", 0)), float(resources.get("CPU", 0))
    per_gpu = options.gpus_per_worker if options.gpus_per_worker is not None else (1.0 if gpus >= 1 else 0.0)
    workers = options.workers or (max(1, int(gpus // per_gpu)) if per_gpu else max(1, int(cpus)))
    gpus_up = per_gpu * workers <= gpus
    per_cpu = options.cpus_per_worker or (max(1.0, float(int(cpus // workers))) if gpus_up else 1.0)
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
    the other, raising the actor's peak (docs/benchmarks.md). Actors with several computing threads
    keep glibc's arena per thread: with one arena their threads wait on each other's allocations.
    A MALLOC_ARENA_MAX of the user's wins."""
    if shape.gpus or shape.slots * shape.threads > 1 or "MALLOC_ARENA_MAX" in os.environ:
        return {}
    return {"env_vars": {"MALLOC_ARENA_MAX": "1"}}


def _await_actors(pool: _Pool, shape: _Shape, timeout: float, say: Callable[[str], None]) -> None:
    """Wait for the actors to start: on an autoscaling cluster their requests make it add nodes,
    which takes minutes. Says what they wait for after 5 s, then every 30 s. Actors still waiting
    after ``timeout`` are given up (the scan goes on with the others); when none started,
    ResourcesUnavailable."""
    ray = pool.ray
    asked = f"{len(pool.actors)} scan actor(s) of {offer({'CPU': shape.cpus, 'GPU': shape.gpus})}"
    waiting = {ref: i for i, ref in enumerate(pool.started)}
    started, t0 = [], time.monotonic()
    while waiting:
        left = timeout - (time.monotonic() - t0)
        if left <= 0:
            break
        step = 30.0 if time.monotonic() - t0 > 1.0 else 5.0
        ready, _ = ray.wait(list(waiting), num_returns=len(waiting), timeout=min(step, left))
        started += [waiting.pop(r) for r in ready]
        for i in started:
            pool.started[i] = True
        if waiting and time.monotonic() - t0 < timeout:
            say(f"waiting for resources: {len(started)} of {asked} started; the cluster offers "
                f"{offer(ray.cluster_resources())} ({time.monotonic() - t0:.0f} of {timeout:g} s)")
    if not waiting:
        return
    if not started:
        pool.close()
        raise ResourcesUnavailable(f"asked for {asked}; after {timeout:g} s none could start: the cluster "
                                   f"offers {offer(ray.cluster_resources())} (--wait-for-resources)")
    say(f"{len(waiting)} of {asked} could not start within {timeout:g} s; scanning with {len(started)}")
    pool.keep(sorted(started))


class _Pool:
    """Actors with at most ``depth`` images each (queued in the actor beyond its concurrency). A dead
    actor is replaced at once and the images it held come back as LOST, for the driver to hand to
    the next free actor. An image that was lost runs alone on an idle actor: images queued beside one
    that kills its actor are lost with it, and only the one that kills it again is charged twice.
    An actor with an image past ``timeout`` is replaced too; the images lost with it come back LOST
    with no cause (not charged)."""

    def __init__(self, remote, args: tuple, workers: int, depth: int, timeout: float | None = None):  # noqa: PLR0913 - the actors and how they are fed
        import ray

        self.ray, self.remote, self.args, self.depth, self.timeout = ray, remote, args, depth, timeout
        self.actors = [remote.remote(*args) for _ in range(workers)]
        self.generation = [0] * workers
        self.busy = [0] * workers
        self.started: list = [a.pid.remote() for a in self.actors]   # True, or the ref that says so
        self.inflight: dict = {}                              # ref -> (actor, generation, item, slots)
        self.retired: set[tuple[int, int]] = set()           # (actor, generation) replaced while sound

    def keep(self, indices: list[int]) -> None:
        """Only the actors at ``indices`` stay (before any image was sent); the others are killed."""
        for a in set(range(len(self.actors))) - set(indices):
            self.ray.kill(self.actors[a], no_restart=True)
        self.actors = [self.actors[a] for a in indices]
        self.generation, self.busy = [0] * len(indices), [0] * len(indices)
        self.started = [self.started[a] for a in indices]

    def _up(self, a: int) -> bool:
        """Whether actor ``a`` has started. Images go to started actors only: a replacement that
        waits for a node (one was lost) holds none while the others go on."""
        if self.started[a] is not True:
            ready, _ = self.ray.wait([self.started[a]], timeout=0)
            if ready:
                self.started[a] = True
        return self.started[a] is True

    def fill(self, queue: deque) -> None:
        """The least busy actor takes the next image, so a short queue spreads over all actors."""
        while queue:
            alone = queue[0].attempts > 0
            room = [a for a in range(len(self.actors))
                    if self.busy[a] < (1 if alone else self.depth) and self._up(a)]
            if not room:
                return
            a = min(room, key=lambda i: self.busy[i])
            item = queue.popleft()
            slots = self.depth if alone else 1
            ref = self.actors[a].scan.remote(item.sample, item.stem, self.timeout)
            self.inflight[ref] = (a, self.generation[a], item, slots)
            self.busy[a] += slots

    def results(self, timeout: float = 1.0) -> Iterator[tuple[_Item, Outcome, Any]]:
        """Yield (item, outcome, value) for whatever finished within ``timeout``: OK with the actor's
        ScanResult, LOST with the actor's death, FAILED with the exception the scan raised."""
        ray = self.ray
        ready, _ = ray.wait(list(self.inflight), num_returns=1, timeout=timeout)
        for ref in ready:
            a, gen, item, slots = self.inflight.pop(ref)
            if gen == self.generation[a]:
                self.busy[a] -= slots
            try:
                result = ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                self._replace(a, gen)
                yield item, Outcome.LOST, None if (a, gen) in self.retired else exc
                continue
            except ray.exceptions.RayTaskError as exc:
                yield item, Outcome.FAILED, exc.cause if getattr(exc, "cause", None) is not None else exc
                continue
            if result.hung:                   # a thread of the actor is stuck for good: replace it
                self.retired.add((a, gen))
                self._replace(a, gen)
            yield item, Outcome.OK, result

    def _replace(self, a: int, gen: int) -> None:
        """A new actor in place of actor ``a`` of generation ``gen`` (once per generation); the
        images the old one held come back LOST."""
        if gen == self.generation[a]:
            self.ray.kill(self.actors[a], no_restart=True)
            self.actors[a] = self.remote.remote(*self.args)
            self.started[a] = self.actors[a].pid.remote()
            self.generation[a], self.busy[a] = gen + 1, 0

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor, no_restart=True)


@dataclass(frozen=True)
class ScanPlan:
    """What one scan computes, from what, into where: absolute URLs, the model's card and the
    settings that change outputs (their ``fingerprint`` marks the records)."""

    model_url: str
    source: str
    out: str
    card: ModelCard
    cfg: InspectConfig
    threshold: float | None
    metrics_cfg: MetricsConfig
    fingerprint: str

    @classmethod
    def create(cls, model_url: str, source: str, out: str, cfg: InspectConfig, threshold: float | None,
               metrics_cfg: MetricsConfig) -> ScanPlan:
        """Load the model once (card, weights and checksum checked: a bad model is one line here,
        before any actor starts); ``threshold`` None takes the card's."""
        model_url, source, out = (storage.absolute(u) for u in (model_url, source, out))
        if storage.contains(out, source):
            raise ValueError(f"{source}: the source lies inside the scan's output {out} (its own outputs "
                             "would be scanned and overwritten); give an OUT outside it")
        card = load_model(model_url).card
        threshold = card.threshold if threshold is None else threshold
        fingerprint = scan_fingerprint(card, cfg, threshold, metrics_cfg)
        return cls(model_url, source, out, card, cfg, threshold, metrics_cfg, fingerprint)

    def target(self) -> ScanTarget:
        return ScanTarget(self.out, self.fingerprint, self.metrics_cfg)


@dataclass
class _Run:
    """One scan as it runs: its plan, its listing, its tally, and who hears of it."""

    plan: ScanPlan
    options: ScanOptions
    tally: _Tally
    ledger: Ledger
    telemetry: ScanRecorder
    progress: Progress | None
    on_error: Callable[[ScanError], None] | None
    t_start: float
    lease: Lease | None = None
    last_told: tuple[_Item, Outcome] | None = None
    recheck: int = 0                  # images without a record before records are no longer read
    retried: int = 0
    storage_retries: int = 0          # storage requests retried by this run's actors and driver
    driver_retries: int = field(default_factory=storage.retries)   # the driver's count when last added

    @classmethod
    def create(cls, plan: ScanPlan, options: ScanOptions, hooks: ScanHooks, t_start: float) -> _Run:
        """Open the ledger (read it, unless ``force``) and the tally."""
        ledger = Ledger(plan.out, plan.fingerprint)
        if not options.force:
            ledger.load()
        tally = _Tally(plan.out, options.shard_size, plan.card.score_range, plan.metrics_cfg, ledger)
        return cls(plan, options, tally, ledger, hooks.get("telemetry") or NULL_SCAN, hooks.get("progress"),
                   hooks.get("on_error"), t_start)

    def tell(self, item: _Item, outcome: Outcome) -> None:
        """Progress after ``item`` ended as ``outcome``."""
        self.last_told = (item, outcome)
        if self.progress:
            counts = self.tally.counts
            self.progress(ScanProgress(
                self.tally.ended(), self.tally.listed, item.sample.key, outcome,
                skipped=counts[Outcome.SKIPPED], failed=counts[Outcome.ERROR], tiles=self.tally.tiles,
                listing=not self.tally.listing_done))

    def seconds(self) -> float:
        return round(time.time() - self.t_start, 3)

    def retried_requests(self, n: int) -> None:
        """``n`` more storage requests were retried (by an actor for one image, or by the driver)."""
        if n:
            self.storage_retries += n
            self.telemetry.storage_retries(n)

    def count_driver_retries(self) -> None:
        """The storage requests the driver itself retried since the last call."""
        now = storage.retries()
        self.retried_requests(now - self.driver_retries)
        self.driver_retries = now


def _recovered(run: _Run, item: _Item) -> bool:
    """After a killed scan: whether ``item`` has a record of this scan. Records are read until
    ``WINDOW`` images in a row have none (the killed scan's images all lie before that)."""
    if run.recheck <= 0:
        return False
    try:
        record = ImageRecord.from_json(storage.read_text(output_urls(run.plan.out, item.stem)["record"]))
        found = record.fingerprint == run.plan.fingerprint and record.version == item.sample.version
    except (storage.StorageError, ValueError, TypeError, AttributeError):
        found = False
    run.recheck = WINDOW if found else run.recheck - 1
    return found


def _source(run: _Run) -> Iterator[_Item]:
    """The images to scan: of the source's listing, or of the keys file (``--keys``)."""
    plan, keys = run.plan, run.options.keys
    if keys is None:
        return _listing(run, ((s, None) for s in iter_samples(plan.source)))
    return _listing(run, keyed_samples(plan.source, read_keys(keys, plan.source)))


def _listing(run: _Run, samples: Iterator[tuple[Sample, str | None]]) -> Iterator[_Item]:
    """The images to scan, in listing order, as the listing arrives. Each listed image enters the
    tally; one the ledger holds (same key, version and settings) ends there as SKIPPED, one that
    does not exist (a key of --keys) as an error. An OUT inside the source is left out, so a rerun
    does not scan its own outputs. No image at all: FileNotFoundError."""
    plan, tally = run.plan, run.tally
    if storage.contains(plan.source, plan.out):
        samples = ((s, p) for s, p in samples if not storage.contains(plan.out, s.url))
    index = 0
    def unsorted(position: int) -> None:
        log.warning("%s: keys are not in key order from key %d on: their outputs are named by their "
                    "whole key (masks/KEY.png)", run.options.keys, position + 1)

    for (sample, problem), stem in streamed_stems(samples, lambda pair: pair[0].key, on_unsorted=unsorted):
        item = _Item(index, sample, stem)
        index += 1
        tally.list(item)
        if problem is not None:
            _fail(run, item, ScanError(sample.key, sample.url, problem, FailureKind.MISSING))
            continue
        stats = _skipped_stats(run, item)
        if stats is None:
            yield item
        else:
            tally.done(item.index, Outcome.SKIPPED, stats or None)
            run.tell(item, Outcome.SKIPPED)
        if index % LISTED_EVERY == 0:
            run.telemetry.listed(tally.listed, tally.counts[Outcome.SKIPPED], complete=False)
    if index == 0:
        if run.options.keys is not None:
            raise FileNotFoundError(f"{run.options.keys}: no keys in this file")
        raise FileNotFoundError(f"{plan.source}: no images ({', '.join(IMAGE_FORMATS)}) found")
    tally.finish_listing()
    run.telemetry.listed(tally.listed, tally.counts[Outcome.SKIPPED], complete=True)
    if run.last_told is not None:
        run.tell(*run.last_told)               # the total is known now


def _skipped_stats(run: _Run, item: _Item) -> bytes | None:
    """Whether the image is complete: None if it is not, else its statistics (b"" for an unlabelled
    image). Complete means in the ledger, or, after a scan that was killed, a record of this scan
    (the killed scan's last images never reached the ledger). A labelled image whose statistics
    cannot be read is scanned again."""
    sample = item.sample
    if run.options.force:
        return None
    if (sample.key, sample.version) not in run.ledger:
        if not _recovered(run, item):
            return None
        run.tally.recovered(item.index)
    if not sample.labelled:
        return b""
    try:
        return storage.read_bytes(output_urls(run.plan.out, item.stem)["stats"])
    except storage.StorageError:
        return None


def _run_failure(exc: BaseException, stage: RunFailure) -> RunFailure:
    """Why the run failed: an interruption, resources that never came, a store that stayed
    unreachable, else the stage it was in."""
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        return RunFailure.INTERRUPTED
    if isinstance(exc, ResourcesUnavailable):
        return RunFailure.RESOURCES
    if isinstance(exc, LeaseHeld):
        return RunFailure.BUSY
    if isinstance(exc, storage.StorageError) and exc.transient:
        return RunFailure.STORAGE
    return stage


@contextlib.contextmanager
def _failing_as(telemetry: ScanRecorder, stage: RunFailure) -> Iterator[None]:
    """A failure inside is the run's (before it started): recorded as failed, with its reason."""
    try:
        yield
    except BaseException as exc:
        telemetry.finish({"failure": _run_failure(exc, stage), "error": storage.short_reason(exc)}, ok=False)
        raise


def scan(model_url: str, source: str, out: str, cfg: InspectConfig = InspectConfig(),
         threshold: float | None = None, metrics_cfg: MetricsConfig = MetricsConfig(),
         options: ScanOptions = ScanOptions(), **hooks: Unpack[ScanHooks]) -> dict:
    """Scan every image of ``source`` (or of ``options.keys``) into ``out`` on Ray actors; returns
    the summary (also in manifest.json) with ``exit_code``. LeaseHeld when another scan is writing
    ``out``. ``hooks`` (see ``ScanHooks``): ``telemetry`` records the run, ``progress(ScanProgress)``
    follows each image, ``on_error`` gets each ScanError."""
    t_start, retries_before = time.time(), storage.retries()
    telemetry = hooks.get("telemetry") or NULL_SCAN
    with _failing_as(telemetry, RunFailure.MODEL):
        plan = ScanPlan.create(model_url, source, out, cfg, threshold, metrics_cfg)
    with _failing_as(telemetry, RunFailure.BUSY):
        lease = Lease(plan.out, options.lease_stale).take()
    try:
        return _run(plan, options, hooks, t_start, retries_before, lease)
    finally:
        lease.close()


def _run(plan: ScanPlan, options: ScanOptions, hooks: ScanHooks, t_start: float,  # noqa: PLR0913 - the scan's parts, once its OUT is held
         retries_before: int, lease: Lease) -> dict:
    """The scan, once it holds OUT's lease."""
    from ray_inspect.distributed.cluster import ensure_ray

    telemetry = hooks.get("telemetry") or NULL_SCAN
    with _failing_as(telemetry, RunFailure.SOURCE):
        run = _Run.create(plan, options, hooks, t_start)
        run.driver_retries, run.lease = retries_before, lease      # the ledger's retries count too
        run.recheck = WINDOW if lease.previous is not None else 0
        storage.remove(storage.join(run.plan.out, "_SUCCESS"))   # a reused OUT is unfinished until done
        listing = _Window(_source(run), 0)
        listing.top_up(WINDOW)                       # the first page: enough to size the pool
    with _failing_as(telemetry, RunFailure.CLUSTER):
        shape = _pool_shape(options, ensure_ray(options.address))
    listing.size = max(WINDOW, 4 * shape.workers * shape.depth)
    workers = shape.workers if not listing.exhausted else min(shape.workers, max(1, len(listing.queue)))
    run.telemetry.start(_start_info(run, workers))
    run.telemetry.listed(run.tally.listed, run.tally.counts[Outcome.SKIPPED], complete=listing.exhausted)
    try:
        _dispatch(run, listing, shape, workers)
        summary = _finalise(run, shape, workers)
        run.count_driver_retries()
    except BaseException as exc:
        _keep_ledger(run)
        run.count_driver_retries()
        run.telemetry.finish({"images": run.tally.listed, "scanned": run.tally.counts[Outcome.OK],
                              "failed": len(run.tally.errors), "seconds": run.seconds(),
                              "failure": _run_failure(exc, RunFailure.INTERNAL)}, ok=False)
        raise
    run.telemetry.finish(summary, ok=True)
    return summary


def _keep_ledger(run: _Run) -> None:
    """A scan that stops early still records what it completed, so that a rerun skips it."""
    try:
        run.tally.flush()
    except storage.StorageError as exc:
        log.warning("could not record the completed images in the ledger (%s): a rerun reads their "
                    "records", storage.short_reason(exc))


@dataclass
class _Window:
    """The listing, read ahead into a queue of at most ``size`` images to scan."""

    listing: Iterator[_Item]
    size: int
    queue: deque = field(default_factory=deque)
    exhausted: bool = False

    def top_up(self, size: int | None = None) -> None:
        want = self.size if size is None else size
        while not self.exhausted and len(self.queue) < want:
            item = next(self.listing, None)
            if item is None:
                self.exhausted = True
            else:
                self.queue.append(item)


def _start_info(run: _Run, workers: int) -> dict:
    plan = run.plan
    return {"run_id": plan.fingerprint + "-" + hex(int(run.t_start))[2:],
            "model_fingerprint": plan.card.fingerprint, "stride": plan.cfg.stride,
            "precision": plan.cfg.precision, "workers": workers, "threshold": plan.threshold}


def _dispatch(run: _Run, listing: _Window, shape: _Shape, workers: int) -> None:
    """Scan the listing on a pool of actors until every listed image has ended in the tally."""
    import ray

    plan, queue = run.plan, listing.queue
    remote = ray.remote(ScanActor).options(num_cpus=shape.cpus, num_gpus=shape.gpus,
                                           max_concurrency=shape.concurrency, max_restarts=0,
                                           runtime_env=_actor_env(shape))
    args = (plan.model_url, plan.card, plan.cfg, plan.threshold, plan.target(), shape.threads, shape.slots)
    pool = _Pool(remote, args, workers if queue else 0, shape.depth, run.options.image_timeout)
    _await_actors(pool, shape, run.options.wait_for_resources, lambda text: log.info("%s", text))
    run.telemetry.actors(len(pool.actors))
    while True:
        if run.lease is not None and run.lease.lost:
            raise LeaseHeld(run.lease.lost)
        listing.top_up()
        if not (queue or pool.inflight):
            if listing.exhausted:
                break
            continue
        pool.fill(queue)
        run.telemetry.in_flight(len(pool.inflight))
        run.count_driver_retries()
        for item, outcome, value in pool.results():
            if outcome is Outcome.OK:
                run.retried_requests(value.retries)
            if outcome is Outcome.LOST:
                _lost(run, queue, item, value)
            elif outcome is Outcome.FAILED:
                _failed(run, item, value)
            elif value.hung:
                _timed_out(run, queue, item, value.error)
            elif value.outcome is Outcome.ERROR:
                _fail(run, item, value.error)
            else:
                _scanned(run, item, value)
    pool.close()
    run.telemetry.actors(0)
    run.telemetry.in_flight(0)


def _scanned(run: _Run, item: _Item, result: ScanResult) -> None:
    """The actor scanned the image: into the tally with its statistics."""
    run.tally.done(item.index, Outcome.OK, result.stats, result.record.tiles)
    run.telemetry.image(result.record)
    run.tell(item, Outcome.OK)


def _lost(run: _Run, queue: deque[_Item], item: _Item, exc: BaseException | None) -> None:
    """The image's actor died: try it on another, unless it has been lost too often. ``exc`` None:
    the actor was replaced for another image's timeout; this one is not charged."""
    if exc is None:
        queue.appendleft(item)
        return
    item.attempts += 1
    run.retried += 1
    if item.attempts < run.options.max_attempts:
        queue.appendleft(item)
    else:
        _fail(run, item, ScanError(item.sample.key, item.sample.url,
                                   f"its worker died {item.attempts} times ({type(exc).__name__})",
                                   FailureKind.WORKER_DIED))


def _timed_out(run: _Run, queue: deque[_Item], item: _Item, error: ScanError) -> None:
    """The image ran past --image-timeout (its actor was replaced): try it again alone, unless it
    has timed out ``max_attempts`` times."""
    item.attempts += 1
    run.retried += 1
    if item.attempts < run.options.max_attempts:
        queue.appendleft(item)
    else:
        _fail(run, item, error)


def _scan_error(sample: Sample, exc: BaseException) -> ScanError:
    """An image whose scan raised something other than bad input: a storage failure, or a bug."""
    kind = FailureKind.STORAGE if isinstance(exc, storage.StorageError) else FailureKind.INTERNAL
    reason = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
    return ScanError(sample.key, sample.url, reason, kind)


def _failed(run: _Run, item: _Item, exc: BaseException) -> None:
    """The scan raised something other than bad input: into errors.jsonl as ``_scan_error`` says."""
    _fail(run, item, _scan_error(item.sample, exc))


def _fail(run: _Run, item: _Item, error: ScanError) -> None:
    """The image was not scanned: into errors.jsonl and the tally."""
    run.tally.errors.append(error)
    run.tally.done(item.index, Outcome.ERROR)
    run.telemetry.failed(error.kind)
    if run.on_error:
        run.on_error(error)
    run.tell(item, Outcome.ERROR)


def _finalise(run: _Run, shape: _Shape, workers: int) -> dict:
    """Write errors.jsonl, the metrics, manifest.json and, last, _SUCCESS; merge a fragmented
    ledger; returns the summary."""
    out, tally = run.plan.out, run.tally
    storage.write_text(storage.join(out, "errors.jsonl"), "".join(e.to_json() + "\n" for e in tally.errors))
    if run.ledger.fragmented():
        run.ledger.compact()
    run.count_driver_retries()
    summary = _summary(run, shape, workers)
    evaluation = tally.evaluation()
    if evaluation is not None and evaluation.images:
        summary["metrics"] = evaluation.metrics()
        storage.write_bytes(storage.join(out, "stats", "roc.npz"), evaluation.raw.to_bytes())
        storage.write_bytes(storage.join(out, "stats", "roc_opened.npz"), evaluation.opened.to_bytes())
        storage.write_text(storage.join(out, "metrics.json"), json.dumps(summary["metrics"], indent=2))
    storage.write_text(storage.join(out, "manifest.json"), json.dumps(summary, indent=2))
    storage.write_text(storage.join(out, "_SUCCESS"), "")
    summary["exit_code"] = _exit_code(tally.errors, run.options.allow_bad_inputs)
    return summary


def _exit_code(errors: list[ScanError], allow_bad_inputs: bool) -> int:
    """0 when every image was scanned (or, allowing bad inputs, when every failure is one), else 3."""
    if not errors or (allow_bad_inputs and all(FailureKind.of(e.kind).bad_input for e in errors)):
        return EXIT_OK
    return EXIT_PARTIAL


def _summary(run: _Run, shape: _Shape, workers: int) -> dict:
    plan, tally = run.plan, run.tally
    return {"model": plan.model_url, "model_fingerprint": plan.card.fingerprint,
            "scan_fingerprint": plan.fingerprint, "source": plan.source, "out": plan.out,
            "images": tally.listed, "scanned": tally.counts[Outcome.OK],
            "skipped": tally.counts[Outcome.SKIPPED], "failed": tally.counts[Outcome.ERROR],
            "failed_by_kind": dict(sorted(Counter(str(e.kind) for e in tally.errors).items())),
            "retried": run.retried, "storage_retries": run.storage_retries, "tiles": tally.tiles,
            "workers": workers,
            "gpus_per_worker": shape.gpus, "cpus_per_worker": shape.cpus, "depth": shape.depth,
            "concurrency": shape.concurrency, "compute_slots": shape.slots, "threads_per_slot": shape.threads,
            "threshold": plan.threshold, "stride": plan.cfg.stride, "precision": plan.cfg.precision,
            "seconds": run.seconds()}
