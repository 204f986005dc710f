"""The metric families of a scan and of a training run, registered once per registry."""

from __future__ import annotations

import threading
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ray_inspect.records import FailureKind, RunFailure
from ray_inspect.telemetry.gauges import LazyGauges

STAGES = ("read", "inference", "residual", "segment", "write")
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                 120.0)
EPOCH_BUCKETS = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
CHECKPOINT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class ScanMetrics:
    """The scan's metric families in one registry."""

    def __init__(self, registry: CollectorRegistry):
        self.images = Counter(
            "ray_inspect_images_scanned", "Images scanned completely (counted once each).", registry=registry)
        self.failed = Counter(
            "ray_inspect_images_failed", "Images not scanned: bad input or lost, by reason.", ["reason"],
            registry=registry)
        self.tiles = Counter(
            "ray_inspect_tiles_processed", "128x128 windows run through the model.", registry=registry)
        self.read_bytes = Counter(
            "ray_inspect_read_bytes", "Bytes of input images (and masks) read.", registry=registry)
        self.written_bytes = Counter(
            "ray_inspect_written_bytes", "Bytes of masks, residuals and records written.", registry=registry)
        self.runs_failed = Counter(
            "ray_inspect_scan_runs_failed", "Scan runs that failed, at any stage (before the model loaded "
            "included), by reason.", ["reason"], registry=registry)
        self.storage_retries = Counter(
            "ray_inspect_storage_retries", "Object-storage requests retried after a transient error "
            "(unreachable store, timeout, throttling), by the scan's actors and driver.", registry=registry)
        self.stage = Histogram(
            "ray_inspect_stage_duration_seconds", "Seconds per image and stage of the scan.", ["stage"],
            buckets=STAGE_BUCKETS, registry=registry)
        self.in_flight = Gauge(
            "ray_inspect_images_in_flight", "Images dispatched to actors and not yet done.",
            registry=registry)
        self.actors = Gauge("ray_inspect_scan_actors", "Live scan actors.", registry=registry)
        self.progress = Gauge(
            "ray_inspect_scan_images", "Images of the current run by state: listed, to_scan (listed minus "
            "skipped), skipped (already done), done (scanned or failed).", ["state"], registry=registry)
        self.samples = LazyGauges()
        registry.register(self.samples)
        # The reasons are FailureKind's fixed vocabulary (a label never carries file names or free
        # text); every reason exists from the start (rate() needs a 0 first).
        for kind in FailureKind:
            self.failed.labels(reason=kind.value)
        for reason in RunFailure:
            self.runs_failed.labels(reason=reason.value)
        for stage in STAGES:
            self.stage.labels(stage=stage)


class TrainMetrics:
    """The training run's metric families in one registry."""

    def __init__(self, registry: CollectorRegistry):
        self.patches = Counter(
            "ray_inspect_train_patches", "Training patches processed (all workers; epochs redone after a "
            "restart count again).", registry=registry)
        self.epoch_seconds = Histogram(
            "ray_inspect_train_epoch_duration_seconds", "Seconds per training epoch.", buckets=EPOCH_BUCKETS,
            registry=registry)
        self.checkpoint_seconds = Histogram(
            "ray_inspect_train_checkpoint_duration_seconds", "Seconds to write and persist one checkpoint.",
            buckets=CHECKPOINT_BUCKETS, registry=registry)
        self.samples = LazyGauges()
        registry.register(self.samples)


Families = TypeVar("Families", ScanMetrics, TrainMetrics)

_FAMILIES: dict[tuple[int, type], tuple[CollectorRegistry, Any]] = {}
_FAMILIES_LOCK = threading.Lock()


def families(registry: CollectorRegistry, cls: type[Families]) -> Families:
    """The metric families of ``cls`` in ``registry``, registered once."""
    with _FAMILIES_LOCK:
        if not _FAMILIES:
            from prometheus_client import disable_created_metrics

            disable_created_metrics()   # no *_created series: they double the exposition for nothing we query
        key = (id(registry), cls)
        if key not in _FAMILIES:
            _FAMILIES[key] = (registry, cls(registry))   # keep the registry alive with its families
        return _FAMILIES[key][1]
