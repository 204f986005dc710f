"""Per-run recorders: what a scan and a training run report, and their records for Prometheus.

``ScanRecorder`` and ``TrainRecorder`` are the contracts the scan's driver and ``fit`` call (one
call per event, see docs/monitoring.md). ``ScanTelemetry`` and ``TrainTelemetry`` keep them in
metric families and push the outcome at the end; ``NULL_SCAN`` and ``NULL_TRAIN`` record nothing
(what a library call without metrics gets).
"""

from __future__ import annotations

import threading
import time
from typing import Protocol, runtime_checkable

from prometheus_client import CollectorRegistry

from ray_inspect.records import FailureKind, ImageRecord, RunFailure
from ray_inspect.telemetry.families import STAGES, ScanMetrics, TrainMetrics
from ray_inspect.telemetry.gauges import LazyGauges, Value
from ray_inspect.telemetry.logs import extra_fields, log, new_run_id, set_run_id
from ray_inspect.telemetry.push import Pusher


def version() -> str:
    """This package's version, as installed ("unknown" when run from a bare source tree)."""
    from importlib import metadata

    try:
        return metadata.version("ray-inspect")
    except metadata.PackageNotFoundError:
        return "unknown"


@runtime_checkable
class ScanRecorder(Protocol):
    """What a scan reports: the driver calls it once per event, from any thread."""

    def start(self, info: dict) -> None:
        """Run begins. ``info``: run_id, version, model_fingerprint, stride, precision, workers,
        threshold (the listing goes on meanwhile: ``listed`` follows it)."""

    def listed(self, images: int, skipped: int, complete: bool) -> None:
        """The listing so far: ``images`` listed, ``skipped`` of them already done; ``complete`` once
        it has ended."""

    def actors(self, n: int) -> None:
        """``n`` scan actors are alive."""

    def in_flight(self, n: int) -> None:
        """``n`` images are dispatched to actors and not yet done."""

    def image(self, record: ImageRecord) -> None:
        """One completed image (the driver has already dropped duplicates of retried images)."""

    def failed(self, kind: FailureKind | str) -> None:
        """One image not scanned (bad input, or lost with its actor)."""

    def storage_retries(self, n: int) -> None:
        """``n`` more object-storage requests were retried (by an actor or by the driver)."""

    def finish(self, summary: dict, ok: bool) -> None:
        """Run ends; ``ok`` when it finished and wrote its outputs."""


@runtime_checkable
class TrainRecorder(Protocol):
    """What a training run reports (``fit`` calls it; ``enabled`` False when it records nothing)."""

    enabled: bool

    def start(self, info: dict) -> None:
        """Run begins: the settings of the run, and optionally its run_id."""

    def epoch(self, stats: dict) -> None:
        """One finished epoch as rank 0 reports it."""

    def finish(self, summary: dict, ok: bool) -> None:
        """Run ends; ``ok`` when the model was written."""


class _Run:
    """Start time, duration and outcome of one run of a command (scan or train)."""

    command = ""

    def __init__(self, samples: LazyGauges, pusher: Pusher | None):
        self._samples, self._pusher = samples, pusher
        self._t0: float | None = None
        self.run_id: str | None = None

    def _name(self, what: str) -> str:
        return f"ray_inspect_{self.command}_{what}"

    def _begin(self, run_id: str | None, info: dict) -> None:
        self.run_id = str(run_id or new_run_id())
        set_run_id(self.run_id)
        self._t0 = t0 = time.time()
        s, command = self._samples, self.command
        labels = {k: ("" if v is None else v) for k, v in {**info, "run_id": self.run_id}.items()}
        s.replace(self._name("info"), f"Settings of the current or last {command} run.", 1, **labels)
        s.set(self._name("start_timestamp_seconds"), f"Unix time the current or last {command} run started.",
              t0)
        self._set_duration(lambda: time.time() - t0)   # grows while the run runs

    def _end(self, ok: bool, outcome: dict[str, float | dict[str, float]], also: tuple[str, ...] = (),
             counters: tuple = ()) -> float:
        """Set the outcome gauges, push them with the gauges named in ``also`` and the ``counters``;
        returns the run's seconds."""
        s, command, now = self._samples, self.command, time.time()
        seconds = now - (self._t0 if self._t0 is not None else now)
        self._set_duration(seconds)
        s.set(self._name("last_run_success"), f"1 if the last finished {command} run succeeded, else 0.",
              1.0 if ok else 0.0)
        names = [self._name(w)
                 for w in ("info", "duration_seconds", "last_run_success", "start_timestamp_seconds")]
        names += also
        for name, value in outcome.items():
            doc = f"Outcome of the last finished {command} run ({name.rsplit('_', 1)[-1]})."
            if isinstance(value, dict):
                for result, v in value.items():
                    s.set(name, doc, v, result=result)
            else:
                s.set(name, doc, value)
            names.append(name)
        if ok:
            s.set(self._name("last_success_timestamp_seconds"),
                  f"Unix time the last successful {command} run finished.", now)
            names.append(self._name("last_success_timestamp_seconds"))
        self._push(names, counters)
        return seconds

    def _set_duration(self, seconds: Value) -> None:
        self._samples.set(self._name("duration_seconds"),
                          f"Seconds the current {self.command} run has run, or the last one ran.", seconds)

    def _push(self, names: list[str], counters: tuple = ()) -> None:
        """The named gauges and the ``counters``, as they are now, to the Pushgateway (when there is one)."""
        if self._pusher is not None:
            registry = CollectorRegistry()
            registry.register(self._samples.frozen(names))
            for counter in counters:
                registry.register(_Snapshot(list(counter.collect())))
            self._pusher.push(registry)


class _Snapshot:
    """Metric families collected once, for a push registry of their own."""

    def __init__(self, families: list):
        self.families = families

    def collect(self):
        return self.families


class ScanTelemetry(_Run):
    """Records one scan for Prometheus: a ``ScanRecorder``. Thread-safe; all methods are cheap (a
    few counter updates)."""

    command = "scan"
    enabled = True

    def __init__(self, metrics: ScanMetrics, pusher: Pusher | None = None):
        super().__init__(metrics.samples, pusher)
        self.m = metrics
        self._lock = threading.Lock()
        self._counts = {"scanned": 0, "failed": 0, "skipped": 0, "tiles": 0}

    @staticmethod
    def disabled() -> ScanRecorder:
        return NULL_SCAN

    def start(self, info: dict) -> None:
        """Run begins (its listing goes on meanwhile: ``listed`` follows it). ``info``: run_id,
        version, model_fingerprint, stride, precision, workers, threshold."""
        labels = {k: info.get(k) for k in ("version", "model_fingerprint", "stride", "precision", "workers",
                                           "threshold")}
        labels["version"] = labels["version"] or version()
        with self._lock:
            self._counts = {"scanned": 0, "failed": 0, "skipped": 0, "tiles": 0}
        self._begin(info.get("run_id"), labels)
        for state in ("listed", "to_scan", "skipped", "done"):
            self.m.progress.labels(state=state).set(0)
        self.m.in_flight.set(0)
        log.info("scan started with %s worker(s); listing the source", labels["workers"],
                 extra=extra_fields({"event": "scan_start", **labels}))

    def listed(self, images: int, skipped: int, complete: bool) -> None:
        p = self.m.progress
        p.labels(state="listed").set(images)
        p.labels(state="to_scan").set(images - skipped)
        p.labels(state="skipped").set(skipped)
        with self._lock:
            self._counts["skipped"] = skipped
        if complete:
            fields = extra_fields({"event": "scan_listed", "images": images, "skipped": skipped})
            log.info("listing finished: %d images, %d to scan, %d already done", images, images - skipped,
                     skipped, extra=fields)

    def actors(self, n: int) -> None:
        self.m.actors.set(n)

    def in_flight(self, n: int) -> None:
        self.m.in_flight.set(n)

    def image(self, record: ImageRecord) -> None:
        """One completed image (the driver has already dropped duplicates of retried images)."""
        m = self.m
        m.images.inc()
        m.tiles.inc(record.tiles)
        m.read_bytes.inc(record.bytes_read)
        m.written_bytes.inc(record.bytes_written)
        for stage, seconds in record.timings.items():
            if stage in STAGES:
                m.stage.labels(stage=stage).observe(seconds)
        self._done("scanned", record.tiles)

    def failed(self, kind: FailureKind | str) -> None:
        """One image not scanned (bad input, or lost with its actor); a ``kind`` outside FailureKind's
        vocabulary counts as "other"."""
        self.m.failed.labels(reason=FailureKind.of(kind).value).inc()
        self._done("failed")

    def storage_retries(self, n: int) -> None:
        """``n`` more object-storage requests were retried (by an actor or by the driver)."""
        self.m.storage_retries.inc(n)

    def _failure(self, reason: RunFailure, error: str) -> tuple[str, ...]:
        """A failed run: counted by reason, and the last run's reason as a gauge (1 for it, 0 for
        the others) for the Pushgateway; returns the gauge's name."""
        self.m.runs_failed.labels(reason=reason.value).inc()
        name = "ray_inspect_scan_last_run_failure"
        for r in RunFailure:
            self.m.samples.set(name, "1 for the reason the last failed scan run failed, else 0.",
                               float(r is reason), reason=r.value)
        log.debug("scan failed (%s): %s", reason.value, error,
                  extra=extra_fields({"event": "scan_failed", "reason": reason.value}))
        return (name,)

    def _done(self, result: str, tiles: int = 0) -> None:
        with self._lock:
            self._counts[result] += 1
            self._counts["tiles"] += tiles
            done = self._counts["scanned"] + self._counts["failed"]
        self.m.progress.labels(state="done").set(done)

    def counts(self) -> dict[str, int]:
        """This run's scanned, failed, skipped images and tiles, as counted here."""
        with self._lock:
            return dict(self._counts)

    def finish(self, summary: dict, ok: bool) -> None:
        """Run ends, at any stage (a run that fails before it started included): duration, outcome,
        last success (only when ``ok``), the failure and its reason (``summary["failure"]``), then
        the Pushgateway push."""
        c = self.counts()
        self.m.in_flight.set(0)
        self.m.actors.set(0)
        images = {k: c[k] for k in ("scanned", "failed", "skipped")}
        started = self._t0 is not None
        also = () if ok else self._failure(RunFailure.of(summary.get("failure")), summary.get("error", ""))
        seconds = self._end(ok, {"ray_inspect_scan_last_run_images": images,
                                 "ray_inspect_scan_last_run_tiles": c["tiles"]}, also,
                            counters=(self.m.runs_failed,))
        self._t0 = None
        if started:      # a run that failed before it started is the caller's one error line
            say = log.info if ok else log.error
            say("scan %s after %.1f s: %d scanned, %d failed, %d tiles", "finished" if ok else "FAILED",
                seconds, c["scanned"], c["failed"], c["tiles"],
                extra=extra_fields({"event": "scan_end", "ok": ok, **c}))
        set_run_id(None)


class TrainTelemetry(_Run):
    """Records one training run for Prometheus: a ``TrainRecorder``."""

    command = "train"
    enabled = True

    def __init__(self, metrics: TrainMetrics, pusher: Pusher | None = None):
        super().__init__(metrics.samples, pusher)
        self.m = metrics
        self._last: dict = {}

    @staticmethod
    def disabled() -> TrainRecorder:
        return NULL_TRAIN

    def start(self, info: dict) -> None:
        """Run begins. ``info``: settings for the _info metric (loss, latent, precision, batch_size,
        epochs, workers, run_name, patches_fingerprint, ...) and optionally run_id."""
        self._last = {}
        labels = {k: v for k, v in info.items() if k != "run_id"}
        labels.setdefault("version", version())
        self._begin(info.get("run_id"), labels)
        if info.get("epochs"):
            self.m.samples.set("ray_inspect_train_epochs", "Epochs the current training run is to reach.",
                               float(info["epochs"]))
        log.info("training started", extra=extra_fields({"event": "train_start", **labels}))

    def epoch(self, stats: dict) -> None:
        """One finished epoch as rank 0 reports it (epoch, loss, patches, seconds, patches_per_s,
        workers, and checkpoint_seconds when it checkpointed)."""
        m, s = self.m, self.m.samples
        m.patches.inc(int(stats.get("patches") or 0))
        if stats.get("seconds"):
            m.epoch_seconds.observe(stats["seconds"])
        if stats.get("checkpoint_seconds") is not None:
            m.checkpoint_seconds.observe(stats["checkpoint_seconds"])
        s.set("ray_inspect_train_epoch", "Last epoch the current training run finished (1-based).",
              float(stats["epoch"]))
        s.set("ray_inspect_train_loss", "Mean training loss of the last epoch.", float(stats["loss"]))
        s.set("ray_inspect_train_patches_per_second", "Training throughput of the last epoch (all workers).",
              float(stats.get("patches_per_s") or 0.0))
        s.set("ray_inspect_train_workers", "Data-parallel workers of the current training run.",
              float(stats.get("workers") or 0))
        self._last = dict(stats)

    def finish(self, summary: dict, ok: bool) -> None:
        """Run ends: duration, outcome, last success (only when ``ok``), then the Pushgateway push."""
        outcome: dict = {"ray_inspect_train_last_run_epochs": float(self._last.get("epoch", 0))}
        if self._last:
            outcome["ray_inspect_train_last_run_loss"] = float(self._last["loss"])
        seconds = self._end(ok, outcome)
        (log.info if ok else log.error)("training %s after %.1f s", "finished" if ok else "FAILED", seconds,
                                        extra=extra_fields({"event": "train_end", "ok": ok, **summary}))
        set_run_id(None)


class _NullScan:
    """A ``ScanRecorder`` that records nothing: the default when no metrics were asked for."""

    enabled = False
    run_id = None

    def start(self, info: dict) -> None: ...
    def listed(self, images: int, skipped: int, complete: bool) -> None: ...
    def actors(self, n: int) -> None: ...
    def in_flight(self, n: int) -> None: ...
    def image(self, record: ImageRecord) -> None: ...
    def failed(self, kind: FailureKind | str) -> None: ...
    def storage_retries(self, n: int) -> None: ...
    def counts(self) -> dict[str, int]: return {}
    def finish(self, summary: dict, ok: bool) -> None: ...


class _NullTrain:
    """A ``TrainRecorder`` that records nothing: the default when no metrics were asked for."""

    enabled = False
    run_id = None

    def start(self, info: dict) -> None: ...
    def epoch(self, stats: dict) -> None: ...
    def finish(self, summary: dict, ok: bool) -> None: ...


NULL_SCAN: ScanRecorder = _NullScan()
NULL_TRAIN: TrainRecorder = _NullTrain()
