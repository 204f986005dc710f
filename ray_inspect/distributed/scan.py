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

import contextlib
import hashlib
import json
import logging
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, TypedDict, Unpack

from ray_inspect.config import DEVICE_ENV, InspectConfig, MetricsConfig, ScanOptions
from ray_inspect.core.evaluation import Evaluation
from ray_inspect.distributed.cluster import ResourcesUnavailable, offer
from ray_inspect.io import storage
from ray_inspect.io.artifact import ModelCard, load_model
from ray_inspect.io.datasets import Sample, list_samples
from ray_inspect.records import (
    FailureKind,
    ImageRecord,
    InputError,
    Outcome,
    RunFailure,
    ScanError,
    ScanProgress,
)
from ray_inspect.steps.imagescan import ScanTarget, output_stems, output_urls, scan_image
from ray_inspect.telemetry import NULL_SCAN, ScanRecorder

log = logging.getLogger(__name__)

EXIT_OK, EXIT_PARTIAL = 0, 3
SCAN_FORMAT = 2          # bump when outputs of the same settings change

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

    def scan(self, sample: Sample, stem: str) -> ScanResult:
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
    status: dict[int, Outcome] = field(default_factory=dict)    # index -> OK | SKIPPED | ERROR
    stats: dict[int, bytes] = field(default_factory=dict)       # labelled, until their shard is written
    errors: list[ScanError] = field(default_factory=list)
    tiles: int = 0
    counts: Counter = field(default_factory=Counter)           # outcome -> images

    def __post_init__(self):
        self.pending: dict[int, int] = {}                            # shard -> labelled images to go
        for i, s in enumerate(self.samples):
            if s.labelled:
                self.pending[i // self.shard_size] = self.pending.get(i // self.shard_size, 0) + 1
        self._shards: dict[int, Evaluation] = {}

    def done(self, index: int, status: Outcome, stats: bytes | None = None, tiles: int = 0) -> None:
        if index in self.status:
            return                                                  # counted once, whatever happens
        self.status[index] = status
        self.counts[status] += 1
        self.tiles += tiles
        if self.samples[index].labelled:
            if stats is not None:
                self.stats[index] = stats
            shard = index // self.shard_size
            self.pending[shard] -= 1
            if self.pending[shard] == 0:
                self._close_shard(shard)

    def count(self, status: Outcome) -> int:
        return sum(1 for v in self.status.values() if v == status)

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


def _complete(out: str, items: list[_Item], fingerprint: str) -> dict[int, ImageRecord]:
    """Records of this scan that are already complete (same fingerprint, same input version)."""
    records_root = storage.join(out, "records")
    if not storage.exists(records_root):
        return {}
    present = set(storage.find(records_root))
    todo = [it for it in items if output_urls(out, it.stem)["record"] in present]

    def read(it: _Item) -> tuple[int, ImageRecord | None]:
        try:
            rec = ImageRecord.from_json(storage.read_text(output_urls(out, it.stem)["record"]))
        except (storage.StorageError, ValueError, TypeError, AttributeError):   # unreadable: scan it again
            return it.index, None
        ok = rec.fingerprint == fingerprint and rec.version == it.sample.version
        return it.index, rec if ok else None

    with ThreadPoolExecutor(16) as pool:
        return {i: rec for i, rec in pool.map(read, todo) if rec is not None}


def _read_stats(out: str, items: list[_Item]) -> dict[int, bytes | None]:
    """Statistics of complete labelled images (None where they cannot be read: scan it again)."""
    def read(it: _Item) -> tuple[int, bytes | None]:
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
    waiting = {a.pid.remote(): i for i, a in enumerate(pool.actors)}
    started, t0 = [], time.monotonic()
    while waiting:
        left = timeout - (time.monotonic() - t0)
        if left <= 0:
            break
        step = 30.0 if time.monotonic() - t0 > 1.0 else 5.0
        ready, _ = ray.wait(list(waiting), num_returns=len(waiting), timeout=min(step, left))
        started += [waiting.pop(r) for r in ready]
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
    that kills its actor are lost with it, and only the one that kills it again is charged twice."""

    def __init__(self, remote, args: tuple, workers: int, depth: int):
        import ray

        self.ray, self.remote, self.args, self.depth = ray, remote, args, depth
        self.actors = [remote.remote(*args) for _ in range(workers)]
        self.generation = [0] * workers
        self.busy = [0] * workers
        self.inflight: dict = {}                              # ref -> (actor, generation, item, slots)

    def keep(self, indices: list[int]) -> None:
        """Only the actors at ``indices`` stay (before any image was sent); the others are killed."""
        for a in set(range(len(self.actors))) - set(indices):
            self.ray.kill(self.actors[a], no_restart=True)
        self.actors = [self.actors[a] for a in indices]
        self.generation, self.busy = [0] * len(indices), [0] * len(indices)

    def fill(self, queue: deque) -> None:
        """The least busy actor takes the next image, so a short queue spreads over all actors."""
        while queue:
            alone = queue[0].attempts > 0
            room = [a for a in range(len(self.actors)) if self.busy[a] < (1 if alone else self.depth)]
            if not room:
                return
            a = min(room, key=lambda i: self.busy[i])
            item = queue.popleft()
            slots = self.depth if alone else 1
            ref = self.actors[a].scan.remote(item.sample, item.stem)
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
                yield item, Outcome.OK, ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                if gen == self.generation[a]:                        # replace a dead actor once
                    ray.kill(self.actors[a], no_restart=True)
                    self.actors[a] = self.remote.remote(*self.args)
                    self.generation[a], self.busy[a] = gen + 1, 0
                yield item, Outcome.LOST, exc
            except ray.exceptions.RayTaskError as exc:
                yield item, Outcome.FAILED, exc.cause if getattr(exc, "cause", None) is not None else exc

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
    """One scan as it runs: its plan, its images, its ledger, and who hears of it."""

    plan: ScanPlan
    options: ScanOptions
    items: list[_Item]
    ledger: _Ledger
    telemetry: ScanRecorder
    progress: Progress | None
    on_error: Callable[[ScanError], None] | None
    t_start: float
    retried: int = 0
    storage_retries: int = 0          # storage requests retried by this run's actors and driver
    driver_retries: int = field(default_factory=storage.retries)   # the driver's count when last added

    @classmethod
    def create(cls, plan: ScanPlan, options: ScanOptions, hooks: ScanHooks, t_start: float) -> _Run:
        """List the source (none: FileNotFoundError) and open the ledger. An OUT inside the source
        is left out of the listing, so a rerun does not scan its own outputs."""
        samples = list_samples(plan.source)
        if storage.contains(plan.source, plan.out):
            kept = [s for s in samples if not storage.contains(plan.out, s.url)]
            log.info("%s lies inside the source: its %d images are not scanned", plan.out,
                     len(samples) - len(kept))
            samples = kept
        if not samples:
            raise FileNotFoundError(f"{plan.source}: no images (PNG, TIFF, JPEG, BMP) found")
        stems = output_stems([s.key for s in samples])
        items = [_Item(i, s, stems[s.key]) for i, s in enumerate(samples)]
        ledger = _Ledger(samples, options.shard_size, plan.card.score_range, plan.metrics_cfg, plan.out)
        return cls(plan, options, items, ledger, hooks.get("telemetry") or NULL_SCAN, hooks.get("progress"),
                   hooks.get("on_error"), t_start)

    def tell(self, item: _Item, outcome: Outcome) -> None:
        """Progress after ``item`` ended as ``outcome``."""
        if self.progress:
            counts = self.ledger.counts
            self.progress(ScanProgress(
                len(self.ledger.status), len(self.items), item.sample.key, outcome,
                skipped=counts[Outcome.SKIPPED], failed=len(self.ledger.status) - counts[Outcome.OK]
                - counts[Outcome.SKIPPED], tiles=self.ledger.tiles))

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


def _run_failure(exc: BaseException, stage: RunFailure) -> RunFailure:
    """Why the run failed: an interruption, resources that never came, a store that stayed
    unreachable, else the stage it was in."""
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        return RunFailure.INTERRUPTED
    if isinstance(exc, ResourcesUnavailable):
        return RunFailure.RESOURCES
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
    """Scan every image of ``source`` into ``out`` on Ray actors; returns the summary (also in
    manifest.json) with ``exit_code``. ``hooks`` (see ``ScanHooks``): ``telemetry`` records the run,
    ``progress(ScanProgress)`` follows each image, ``on_error`` gets each ScanError."""
    from ray_inspect.distributed.cluster import ensure_ray

    t_start, retries_before = time.time(), storage.retries()
    telemetry = hooks.get("telemetry") or NULL_SCAN
    with _failing_as(telemetry, RunFailure.MODEL):
        plan = ScanPlan.create(model_url, source, out, cfg, threshold, metrics_cfg)
    with _failing_as(telemetry, RunFailure.SOURCE):
        run = _Run.create(plan, options, hooks, t_start)
        run.driver_retries = retries_before          # the listing's retries count too
        storage.remove(storage.join(run.plan.out, "_SUCCESS"))   # a reused OUT is unfinished until done
        queue = _resume(run)
    with _failing_as(telemetry, RunFailure.CLUSTER):
        shape = _pool_shape(options, ensure_ray(options.address))
    workers = min(shape.workers, max(1, len(queue)))
    run.telemetry.start(_start_info(run, workers, len(queue)))
    try:
        _dispatch(run, queue, shape, workers)
        summary = _finalise(run, shape, workers)
        run.count_driver_retries()
    except BaseException as exc:
        run.count_driver_retries()
        run.telemetry.finish({"images": len(run.items), "scanned": run.ledger.count(Outcome.OK),
                              "failed": len(run.ledger.errors), "seconds": run.seconds(),
                              "failure": _run_failure(exc, RunFailure.INTERNAL)}, ok=False)
        raise
    run.telemetry.finish(summary, ok=True)
    return summary


def _resume(run: _Run) -> deque[_Item]:
    """Count the images this scan already completed as SKIPPED; the others, in listing order, to scan."""
    out = run.plan.out
    complete = {} if run.options.force else _complete(out, run.items, run.plan.fingerprint)
    stats = _read_stats(out, [it for it in run.items if it.index in complete and it.sample.labelled])
    complete = {i: rec for i, rec in complete.items() if stats.get(i, b"") is not None}
    for i in complete:
        run.ledger.done(i, Outcome.SKIPPED, stats.get(i))
        run.tell(run.items[i], Outcome.SKIPPED)
    return deque(it for it in run.items if it.index not in complete)


def _start_info(run: _Run, workers: int, to_scan: int) -> dict:
    plan = run.plan
    return {"run_id": plan.fingerprint + "-" + hex(int(run.t_start))[2:],
            "model_fingerprint": plan.card.fingerprint, "stride": plan.cfg.stride,
            "precision": plan.cfg.precision, "workers": workers, "threshold": plan.threshold,
            "images_total": len(run.items), "to_scan": to_scan, "skipped": len(run.items) - to_scan}


def _dispatch(run: _Run, queue: deque[_Item], shape: _Shape, workers: int) -> None:
    """Scan the queue on a pool of actors until every image has ended in the ledger."""
    import ray

    plan = run.plan
    remote = ray.remote(ScanActor).options(num_cpus=shape.cpus, num_gpus=shape.gpus,
                                           max_concurrency=shape.concurrency, max_restarts=0,
                                           runtime_env=_actor_env(shape))
    args = (plan.model_url, plan.card, plan.cfg, plan.threshold, plan.target(), shape.threads, shape.slots)
    pool = _Pool(remote, args, workers if queue else 0, shape.depth)
    _await_actors(pool, shape, run.options.wait_for_resources, lambda text: log.info("%s", text))
    run.telemetry.actors(len(pool.actors))
    while queue or pool.inflight:
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
            elif value.outcome is Outcome.ERROR:
                _fail(run, item, value.error)
            else:
                _scanned(run, item, value)
    pool.close()
    run.telemetry.actors(0)
    run.telemetry.in_flight(0)


def _scanned(run: _Run, item: _Item, result: ScanResult) -> None:
    """The actor scanned the image: into the ledger with its statistics."""
    run.ledger.done(item.index, Outcome.OK, result.stats, result.record.tiles)
    run.telemetry.image(result.record)
    run.tell(item, Outcome.OK)


def _lost(run: _Run, queue: deque[_Item], item: _Item, exc: BaseException) -> None:
    """The image's actor died: try it on another, unless it has been lost too often."""
    item.attempts += 1
    run.retried += 1
    if item.attempts < run.options.max_attempts:
        queue.appendleft(item)
    else:
        _fail(run, item, ScanError(item.sample.key, item.sample.url,
                                   f"its worker died {item.attempts} times ({type(exc).__name__})",
                                   FailureKind.WORKER_DIED))


def _scan_error(sample: Sample, exc: BaseException) -> ScanError:
    """An image whose scan raised something other than bad input: a storage failure, or a bug."""
    kind = FailureKind.STORAGE if isinstance(exc, storage.StorageError) else FailureKind.INTERNAL
    reason = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
    return ScanError(sample.key, sample.url, reason, kind)


def _failed(run: _Run, item: _Item, exc: BaseException) -> None:
    """The scan raised something other than bad input: into errors.jsonl as ``_scan_error`` says."""
    _fail(run, item, _scan_error(item.sample, exc))


def _fail(run: _Run, item: _Item, error: ScanError) -> None:
    """The image was not scanned: into errors.jsonl and the ledger."""
    run.ledger.errors.append(error)
    run.ledger.done(item.index, Outcome.ERROR)
    run.telemetry.failed(error.kind)
    if run.on_error:
        run.on_error(error)
    run.tell(item, Outcome.ERROR)


def _finalise(run: _Run, shape: _Shape, workers: int) -> dict:
    """Write errors.jsonl, the metrics, manifest.json and, last, _SUCCESS; returns the summary."""
    out, ledger = run.plan.out, run.ledger
    storage.write_text(storage.join(out, "errors.jsonl"), "".join(e.to_json() + "\n" for e in ledger.errors))
    run.count_driver_retries()
    summary = _summary(run, shape, workers)
    evaluation = ledger.evaluation()
    if evaluation is not None and evaluation.images:
        summary["metrics"] = evaluation.metrics()
        storage.write_bytes(storage.join(out, "stats", "roc.npz"), evaluation.raw.to_bytes())
        storage.write_bytes(storage.join(out, "stats", "roc_opened.npz"), evaluation.opened.to_bytes())
        storage.write_text(storage.join(out, "metrics.json"), json.dumps(summary["metrics"], indent=2))
    entries = [{"key": it.sample.key, "stem": it.stem, "status": ledger.status.get(it.index, Outcome.MISSING)}
               for it in run.items]
    manifest = json.dumps({**summary, "entries": entries}, indent=2)
    storage.write_text(storage.join(out, "manifest.json"), manifest)
    storage.write_text(storage.join(out, "_SUCCESS"), "")
    summary["exit_code"] = _exit_code(ledger.errors, run.options.allow_bad_inputs)
    return summary


def _exit_code(errors: list[ScanError], allow_bad_inputs: bool) -> int:
    """0 when every image was scanned (or, allowing bad inputs, when every failure is one), else 3."""
    if not errors or (allow_bad_inputs and all(FailureKind.of(e.kind).bad_input for e in errors)):
        return EXIT_OK
    return EXIT_PARTIAL


def _summary(run: _Run, shape: _Shape, workers: int) -> dict:
    plan, ledger = run.plan, run.ledger
    return {"model": plan.model_url, "model_fingerprint": plan.card.fingerprint,
            "scan_fingerprint": plan.fingerprint, "source": plan.source, "out": plan.out,
            "images": len(run.items), "scanned": ledger.count(Outcome.OK),
            "skipped": ledger.count(Outcome.SKIPPED), "failed": ledger.count(Outcome.ERROR),
            "failed_by_kind": dict(sorted(Counter(str(e.kind) for e in ledger.errors).items())),
            "retried": run.retried, "storage_retries": run.storage_retries, "tiles": ledger.tiles,
            "workers": workers,
            "gpus_per_worker": shape.gpus, "cpus_per_worker": shape.cpus, "depth": shape.depth,
            "concurrency": shape.concurrency, "compute_slots": shape.slots, "threads_per_slot": shape.threads,
            "threshold": plan.threshold, "stride": plan.cfg.stride, "precision": plan.cfg.precision,
            "seconds": run.seconds()}
