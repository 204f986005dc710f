"""Observability of scan and training runs: Prometheus metrics, a Pushgateway outcome, JSON logs.

The driver process is the single exposer of ``ray_inspect_*`` metrics (docs/monitoring.md says why):
actors hand per-image records back to the driver, which counts each image once. ``Telemetry`` holds
the settings of one process (``configure`` builds it from the command-line options); its ``scan()``
and ``train()`` give the per-run recorders ``ScanTelemetry`` and ``TrainTelemetry``. Without a
metrics port or a Pushgateway they are no-op recorders, so library calls cost nothing.

Imports neither Ray nor click (the method core and the actors may import it).
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as _dt
import json
import logging
import os
import re
import secrets
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ray_inspect.config import LOG_FORMATS, PIPELINE_ENV, TelemetryConfig

log = logging.getLogger("ray_inspect")

STAGES = ("read", "inference", "residual", "segment", "write")
# Failure reasons are a fixed vocabulary (a label must not carry file names or free text); any
# other kind is counted as "other".
FAILURE_REASONS = ("empty", "corrupt", "unreadable", "mode", "nan", "range", "size", "mask", "invalid",
                   "read", "decode", "format", "storage", "worker_died", "internal", "other")
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
EPOCH_BUCKETS = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
CHECKPOINT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


def version() -> str:
    from importlib import metadata

    try:
        return metadata.version("ray-inspect")
    except metadata.PackageNotFoundError:
        return "unknown"


def new_run_id() -> str:
    """A sortable, unique run id: UTC start time and 6 random hex digits."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


# --------------------------------------------------------------------------------------------
# Gauges that exist only once set
# --------------------------------------------------------------------------------------------

class Samples(Collector):
    """Gauges that appear only once known: a last-success time of 0 would read as "failed since 1970",
    and a loss of 0 before the first epoch as a perfect model. Values may be callables (read at scrape)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._docs: dict[str, tuple[str, tuple[str, ...]]] = {}
        self._values: dict[str, dict[tuple[str, ...], float | Callable[[], float]]] = {}

    def set(self, name: str, doc: str, value: float | Callable[[], float], **labels: Any) -> None:
        names = tuple(sorted(labels))
        with self._lock:
            self._docs[name] = (doc, names)
            self._values.setdefault(name, {})[tuple(str(labels[n]) for n in names)] = value

    def replace(self, name: str, doc: str, value: float, **labels: Any) -> None:
        """Set the only series of ``name`` (an _info metric whose labels changed)."""
        with self._lock:
            self._values.pop(name, None)
        self.set(name, doc, value, **labels)

    def get(self, name: str, **labels: Any) -> float | None:
        with self._lock:
            v = self._values.get(name, {}).get(tuple(str(labels[n]) for n in sorted(labels)))
        return v() if callable(v) else v

    def frozen(self, names: Iterable[str]) -> "Samples":
        """A copy of the named gauges with their current values (the outcome pushed at the end)."""
        out = Samples()
        with self._lock:
            items = [(n, self._docs[n], dict(self._values[n])) for n in names if n in self._values]
        for name, (doc, labelnames), values in items:
            for lv, v in values.items():
                out.set(name, doc, v() if callable(v) else v, **dict(zip(labelnames, lv)))
        return out

    def describe(self) -> list:
        return []   # names vary with the run; no collision check needed

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self._lock:
            items = [(n, self._docs[n], dict(v)) for n, v in self._values.items()]
        for name, (doc, labelnames), values in items:
            g = GaugeMetricFamily(name, doc, labels=labelnames)
            for lv, v in values.items():
                g.add_metric(list(lv), float(v() if callable(v) else v))
            yield g


# --------------------------------------------------------------------------------------------
# Metric families (one set per registry)
# --------------------------------------------------------------------------------------------

class ScanMetrics:
    """The scan's metric families in one registry."""

    def __init__(self, registry: CollectorRegistry):
        self.images = Counter("ray_inspect_images_scanned", "Images scanned completely (counted once each).",
                              registry=registry)
        self.failed = Counter("ray_inspect_images_failed", "Images not scanned: bad input or lost, by reason.",
                              ["reason"], registry=registry)
        self.tiles = Counter("ray_inspect_tiles_processed", "128x128 windows run through the model.",
                             registry=registry)
        self.read_bytes = Counter("ray_inspect_read_bytes", "Bytes of input images (and masks) read.",
                                  registry=registry)
        self.written_bytes = Counter("ray_inspect_written_bytes", "Bytes of masks, residuals and records written.",
                                     registry=registry)
        self.stage = Histogram("ray_inspect_stage_duration_seconds", "Seconds per image and stage of the scan.",
                               ["stage"], buckets=STAGE_BUCKETS, registry=registry)
        self.in_flight = Gauge("ray_inspect_images_in_flight", "Images dispatched to actors and not yet done.",
                               registry=registry)
        self.actors = Gauge("ray_inspect_scan_actors", "Live scan actors.", registry=registry)
        self.progress = Gauge("ray_inspect_scan_images", "Images of the current run by state: listed, to_scan "
                              "(listed minus skipped), skipped (already done), done (scanned or failed).",
                              ["state"], registry=registry)
        self.samples = Samples()
        registry.register(self.samples)
        for reason in FAILURE_REASONS:   # every reason exists from the start (rate() needs a 0 first)
            self.failed.labels(reason=reason)
        for stage in STAGES:
            self.stage.labels(stage=stage)


class TrainMetrics:
    """The training run's metric families in one registry."""

    def __init__(self, registry: CollectorRegistry):
        self.patches = Counter("ray_inspect_train_patches", "Training patches processed (all workers; "
                               "epochs redone after a restart count again).", registry=registry)
        self.epoch_seconds = Histogram("ray_inspect_train_epoch_duration_seconds", "Seconds per training epoch.",
                                       buckets=EPOCH_BUCKETS, registry=registry)
        self.checkpoint_seconds = Histogram("ray_inspect_train_checkpoint_duration_seconds",
                                            "Seconds to write and persist one checkpoint.",
                                            buckets=CHECKPOINT_BUCKETS, registry=registry)
        self.samples = Samples()
        registry.register(self.samples)


_FAMILIES: dict[tuple[int, type], Any] = {}
_FAMILIES_LOCK = threading.Lock()


def _families(registry: CollectorRegistry, cls: type):
    """The metric families of ``cls`` in ``registry``, registered once."""
    with _FAMILIES_LOCK:
        if not _FAMILIES:
            from prometheus_client import disable_created_metrics

            disable_created_metrics()   # no *_created series: they double the exposition for nothing we query
        key = (id(registry), cls)
        if key not in _FAMILIES:
            _FAMILIES[key] = (registry, cls(registry))   # keep the registry alive with its families
        return _FAMILIES[key][1]


# --------------------------------------------------------------------------------------------
# Pushgateway
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Pusher:
    """Pushes a finished run's outcome to a Pushgateway group ``job=<job>, pipeline=<pipeline>``.

    POST (pushadd) replaces only the metric names it carries; a failed run's push leaves out the
    last-success gauge, so the previous success's timestamp stays in the group.
    """

    url: str
    job: str
    pipeline: str = "default"
    timeout: float = 10.0

    def push(self, registry: CollectorRegistry) -> bool:
        from prometheus_client import pushadd_to_gateway

        try:
            pushadd_to_gateway(self.url, job=self.job, registry=registry, grouping_key={"pipeline": self.pipeline},
                               timeout=self.timeout)
            return True
        except Exception as exc:  # noqa: BLE001 - monitoring must not fail a finished run
            log.warning("push to the Pushgateway failed: %s", exc)
            return False


# --------------------------------------------------------------------------------------------
# Run recorders
# --------------------------------------------------------------------------------------------

class _Run:
    """Start time, duration and outcome of one run of a command (scan or train)."""

    command = ""

    def __init__(self, samples: Samples, pusher: Pusher | None):
        self._samples, self._pusher = samples, pusher
        self._t0: float | None = None
        self.run_id: str | None = None

    def _name(self, what: str) -> str:
        return f"ray_inspect_{self.command}_{what}"

    def _begin(self, run_id: str | None, info: dict) -> None:
        self.run_id = str(run_id or new_run_id())
        set_run_id(self.run_id)
        self._t0 = t0 = time.time()
        s = self._samples
        s.replace(self._name("info"), f"Settings of the current or last {self.command} run.", 1,
                  **{k: ("" if v is None else v) for k, v in {**info, "run_id": self.run_id}.items()})
        s.set(self._name("start_timestamp_seconds"), f"Unix time the current or last {self.command} run started.", t0)
        s.set(self._name("duration_seconds"), f"Seconds the current {self.command} run has run, or the last one ran.",
              lambda: time.time() - t0)

    def _end(self, ok: bool, outcome: dict[str, float | dict[str, float]]) -> float:
        s, now = self._samples, time.time()
        seconds = now - (self._t0 if self._t0 is not None else now)
        s.set(self._name("duration_seconds"), f"Seconds the current {self.command} run has run, or the last one ran.",
              seconds)
        s.set(self._name("last_run_success"), f"1 if the last finished {self.command} run succeeded, else 0.",
              1.0 if ok else 0.0)
        names = [self._name(w) for w in ("info", "duration_seconds", "last_run_success", "start_timestamp_seconds")]
        for name, value in outcome.items():
            doc = f"Outcome of the last finished {self.command} run ({name.rsplit('_', 1)[-1]})."
            if isinstance(value, dict):
                for label, v in value.items():
                    s.set(name, doc, v, result=label)
            else:
                s.set(name, doc, value)
            names.append(name)
        if ok:
            s.set(self._name("last_success_timestamp_seconds"),
                  f"Unix time the last successful {self.command} run finished.", now)
            names.append(self._name("last_success_timestamp_seconds"))
        if self._pusher is not None:
            registry = CollectorRegistry()
            registry.register(s.frozen(names))
            self._pusher.push(registry)
        return seconds


class ScanTelemetry(_Run):
    """Records one scan for Prometheus; the driver calls it once per event (see the contract in
    docs/monitoring.md). Thread-safe; all methods are cheap (a few counter updates)."""

    command = "scan"
    enabled = True

    def __init__(self, metrics: ScanMetrics, pusher: Pusher | None = None):
        super().__init__(metrics.samples, pusher)
        self.m = metrics
        self._lock = threading.Lock()
        self._counts = {"scanned": 0, "failed": 0, "skipped": 0, "tiles": 0}

    @staticmethod
    def disabled() -> "ScanTelemetry":
        return NULL_SCAN

    def start(self, info: dict) -> None:
        """Run begins. ``info``: run_id, version, model_fingerprint, stride, precision, workers,
        images_total, to_scan, skipped, threshold."""
        counts = {k: int(info.get(k) or 0) for k in ("images_total", "to_scan", "skipped")}
        labels = {k: info.get(k) for k in ("version", "model_fingerprint", "stride", "precision", "workers",
                                           "threshold")}
        labels["version"] = labels["version"] or version()
        with self._lock:
            self._counts = {"scanned": 0, "failed": 0, "skipped": counts["skipped"], "tiles": 0}
        self._begin(info.get("run_id"), labels)
        p = self.m.progress
        p.labels(state="listed").set(counts["images_total"])
        p.labels(state="to_scan").set(counts["to_scan"])
        p.labels(state="skipped").set(counts["skipped"])
        p.labels(state="done").set(0)
        self.m.in_flight.set(0)
        log.info("scan started: %d images, %d to scan, %d already done", counts["images_total"], counts["to_scan"],
                 counts["skipped"], extra=_extra({"event": "scan_start", **labels}))

    def actors(self, n: int) -> None:
        self.m.actors.set(n)

    def in_flight(self, n: int) -> None:
        self.m.in_flight.set(n)

    def image(self, record: dict) -> None:
        """One completed image (the driver has already dropped duplicates of retried images)."""
        m, tiles = self.m, int(record.get("tiles") or 0)
        m.images.inc()
        m.tiles.inc(tiles)
        m.read_bytes.inc(int(record.get("bytes_read") or 0))
        m.written_bytes.inc(int(record.get("bytes_written") or 0))
        for stage, seconds in (record.get("timings") or {}).items():
            if stage in STAGES:
                m.stage.labels(stage=stage).observe(seconds)
        with self._lock:
            self._counts["scanned"] += 1
            self._counts["tiles"] += tiles
            done = self._counts["scanned"] + self._counts["failed"]
        m.progress.labels(state="done").set(done)

    def failed(self, kind: str) -> None:
        """One image not scanned (bad input, or lost with its actor); ``kind`` is a short fixed word."""
        self.m.failed.labels(reason=kind if kind in FAILURE_REASONS else "other").inc()
        with self._lock:
            self._counts["failed"] += 1
            done = self._counts["scanned"] + self._counts["failed"]
        self.m.progress.labels(state="done").set(done)

    def counts(self) -> dict[str, int]:
        """This run's scanned, failed, skipped images and tiles, as counted here."""
        with self._lock:
            return dict(self._counts)

    def finish(self, summary: dict, ok: bool) -> None:
        """Run ends: duration, outcome, last success (only when ``ok``), then the Pushgateway push."""
        c = self.counts()
        self.m.in_flight.set(0)
        self.m.actors.set(0)
        seconds = self._end(ok, {"ray_inspect_scan_last_run_images": {k: c[k] for k in ("scanned", "failed",
                                                                                          "skipped")},
                                 "ray_inspect_scan_last_run_tiles": c["tiles"]})
        (log.info if ok else log.error)("scan %s after %.1f s: %d scanned, %d failed, %d tiles",
                                        "finished" if ok else "FAILED", seconds, c["scanned"], c["failed"],
                                        c["tiles"], extra=_extra({"event": "scan_end", "ok": ok, **c}))
        set_run_id(None)


class TrainTelemetry(_Run):
    """Records one training run for Prometheus (``raytrain.fit`` calls it)."""

    command = "train"
    enabled = True

    def __init__(self, metrics: TrainMetrics, pusher: Pusher | None = None):
        super().__init__(metrics.samples, pusher)
        self.m = metrics
        self._last: dict = {}

    @staticmethod
    def disabled() -> "TrainTelemetry":
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
        log.info("training started", extra=_extra({"event": "train_start", **labels}))

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
                                        extra=_extra({"event": "train_end", "ok": ok, **summary}))
        set_run_id(None)


class _NullScan(ScanTelemetry):
    """Does nothing: the default when no metrics were asked for."""

    enabled = False

    def __init__(self) -> None:  # noqa: D107 - no metrics, no registry
        self.run_id = None

    def start(self, info: dict) -> None: ...
    def actors(self, n: int) -> None: ...
    def in_flight(self, n: int) -> None: ...
    def image(self, record: dict) -> None: ...
    def failed(self, kind: str) -> None: ...
    def counts(self) -> dict[str, int]: return {}
    def finish(self, summary: dict, ok: bool) -> None: ...


class _NullTrain(TrainTelemetry):
    """Does nothing: the default when no metrics were asked for."""

    enabled = False

    def __init__(self) -> None:  # noqa: D107
        self.run_id = None

    def start(self, info: dict) -> None: ...
    def epoch(self, stats: dict) -> None: ...
    def finish(self, summary: dict, ok: bool) -> None: ...


NULL_SCAN: ScanTelemetry = _NullScan()
NULL_TRAIN: TrainTelemetry = _NullTrain()


# --------------------------------------------------------------------------------------------
# The process's settings: exposure, push, logging
# --------------------------------------------------------------------------------------------

PROCESS_REGISTRY = CollectorRegistry()   # what the command line exposes (plus process and GC metrics)
_SERVERS: dict[tuple[str, int, int], Any] = {}
_SERVERS_LOCK = threading.Lock()
_process_collectors = False


def _process_registry() -> CollectorRegistry:
    global _process_collectors
    with _SERVERS_LOCK:
        if not _process_collectors:
            from prometheus_client import GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR

            for c in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
                PROCESS_REGISTRY.register(c)
            _process_collectors = True
    return PROCESS_REGISTRY


class Telemetry:
    """One process's telemetry: serves its registry on the metrics port (started on first use) and
    hands out per-run recorders."""

    def __init__(self, cfg: TelemetryConfig = TelemetryConfig(), registry: CollectorRegistry | None = None):
        self.cfg = cfg
        self.registry = registry if registry is not None else _process_registry()

    @staticmethod
    def disabled() -> "Telemetry":
        return Telemetry(TelemetryConfig(), CollectorRegistry())

    @property
    def enabled(self) -> bool:
        return self.cfg.metrics_port > 0 or bool(self.cfg.pushgateway)

    def serve(self) -> int | None:
        """Start the HTTP exposition on ``metrics_bind:metrics_port`` once per process; returns the port."""
        if self.cfg.metrics_port <= 0:
            return None
        key = (self.cfg.metrics_bind, self.cfg.metrics_port, id(self.registry))
        with _SERVERS_LOCK:
            if key not in _SERVERS:
                from prometheus_client import start_http_server

                try:
                    _SERVERS[key] = start_http_server(self.cfg.metrics_port, addr=self.cfg.metrics_bind,
                                                      registry=self.registry)
                except OSError as exc:
                    raise ValueError(f"--metrics-port {self.cfg.metrics_port} on {self.cfg.metrics_bind}: "
                                     f"{exc.strerror or exc}") from None
                log.info("metrics on http://%s:%d/metrics", self.cfg.metrics_bind, self.cfg.metrics_port)
        return self.cfg.metrics_port

    def close(self) -> None:
        """Stop this telemetry's HTTP server (tests; a command's server lives as long as the process)."""
        key = (self.cfg.metrics_bind, self.cfg.metrics_port, id(self.registry))
        with _SERVERS_LOCK:
            server = _SERVERS.pop(key, None)
        if server is not None:
            server[0].shutdown()
            server[0].server_close()

    def _pusher(self, job: str) -> Pusher | None:
        return Pusher(self.cfg.pushgateway, job, self.cfg.pipeline) if self.cfg.pushgateway else None

    def scan(self) -> ScanTelemetry:
        """The recorder for one scan (a no-op one when metrics are off)."""
        if not self.enabled:
            return NULL_SCAN
        self.serve()
        return ScanTelemetry(_families(self.registry, ScanMetrics), self._pusher("ray_inspect_scan"))

    def train(self) -> TrainTelemetry:
        """The recorder for one training run (a no-op one when metrics are off)."""
        if not self.enabled:
            return NULL_TRAIN
        self.serve()
        return TrainTelemetry(_families(self.registry, TrainMetrics), self._pusher("ray_inspect_train"))

    def say(self, message: str, level: int = logging.INFO, key: str | None = None, **fields: Any) -> None:
        """A progress line: plain text on stderr, or one JSON log record with ``--log-format json``."""
        if self.cfg.log_format == "json":
            log.log(level, message, extra=_extra({**fields, **({"key": key} if key else {})}))
        else:
            print(redact(message), file=sys.stderr, flush=True)


_current = Telemetry.disabled()


def configure(metrics_port: int = 0, metrics_bind: str = "127.0.0.1", pushgateway: str | None = None,
              log_format: str = "text", pipeline: str | None = None) -> Telemetry:
    """Telemetry of this process from the command-line options; also sets up logging. The HTTP
    server starts when a command first asks for its recorder (``scan()``/``train()``)."""
    global _current
    kw = {"pipeline": pipeline} if pipeline else {}
    cfg = TelemetryConfig(metrics_port=metrics_port or 0, metrics_bind=metrics_bind or "127.0.0.1",
                          pushgateway=pushgateway or None, log_format=log_format or "text", **kw)
    configure_logging(cfg.log_format)
    _current = Telemetry(cfg)
    return _current


def current() -> Telemetry:
    """The telemetry ``configure`` set up last (a disabled one if none)."""
    return _current


# --------------------------------------------------------------------------------------------
# Logging: run id and image key on every record, credentials never
# --------------------------------------------------------------------------------------------

_run_id: str | None = None
_image_key: contextvars.ContextVar[str | None] = contextvars.ContextVar("ray_inspect_image_key", default=None)
_SECRET_NAME = re.compile(r"^AWS_|SECRET|TOKEN|PASSW|CREDENTIAL|ACCESS_KEY", re.I)
_URL_USERINFO = re.compile(r"(?<=://)[^/@\s:]+:[^/@\s]+@")
_KEY_VALUE = re.compile(r"(?i)((?:secret|password|passwd|token|access_key|session_key)[\w-]*[\"']?\s*[:=]\s*[\"']?)"
                        r"([^\s\"',;}&]+)")
MASK = "***"


def set_run_id(run_id: str | None) -> None:
    """The run id put on every log record of this process (one run at a time per driver)."""
    global _run_id
    _run_id = run_id


@contextlib.contextmanager
def image_key(key: str) -> Iterator[None]:
    """Log records inside the block carry ``key`` (this thread/task only)."""
    token = _image_key.set(key)
    try:
        yield
    finally:
        _image_key.reset(token)


def _secret_values() -> list[str]:
    vals = {v for k, v in os.environ.items() if _SECRET_NAME.search(k) and len(v) >= 6}
    return sorted(vals, key=len, reverse=True)   # longest first: a secret containing another is masked whole


def redact(text: str) -> str:
    """``text`` without credentials: values of AWS_* and secret-named environment variables,
    passwords in URLs, ``secret=...``/``token: ...`` pairs."""
    for v in _secret_values():
        if v in text:
            text = text.replace(v, MASK)
    text = _URL_USERINFO.sub(MASK + "@", text)
    return _KEY_VALUE.sub(lambda m: m.group(1) + MASK, text)


def _plain(v: Any) -> bool:
    return isinstance(v, (str, int, float, bool)) or v is None


_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


def _extra(fields: dict) -> dict:
    """Fields for ``extra=``: plain values, None dropped, names LogRecord reserves left out."""
    return {k: v for k, v in fields.items() if v is not None and _plain(v) and k not in _RESERVED}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, run_id, key, extra fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": _dt.datetime.fromtimestamp(record.created, _dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        run_id = getattr(record, "run_id", None) or _run_id
        key = getattr(record, "key", None) or _image_key.get()
        if run_id:
            out["run_id"] = run_id
        if key:
            out["key"] = key
        for k, v in record.__dict__.items():
            if k not in _RESERVED and k not in out and k not in ("run_id", "key") and not k.startswith("_"):
                out[k] = v if _plain(v) else str(v)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps({k: redact(v) if isinstance(v, str) else v for k, v in out.items()}, default=str)


class TextFormatter(logging.Formatter):
    """``ray-inspect: warning: ...`` for warnings and errors, the bare message otherwise."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        if record.levelno >= logging.WARNING:
            msg = f"ray-inspect: {record.levelname.lower()}: {msg}"
        return redact(msg)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (click's test runner swaps it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def configure_logging(log_format: str = "text", stream=None, level: int = logging.INFO) -> logging.Handler:
    """Route the ``ray_inspect`` loggers to stderr (or ``stream``) as text or JSON lines; replaces the
    handler an earlier call installed. Text mode shows warnings and errors only (progress lines are
    printed by the commands themselves)."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}")
    for h in [h for h in log.handlers if getattr(h, "_ray_inspect", False)]:
        log.removeHandler(h)
    handler = logging.StreamHandler(stream) if stream is not None else _StderrHandler()
    handler._ray_inspect = True  # type: ignore[attr-defined]
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.setLevel(level if log_format == "json" else logging.WARNING)
    log.addHandler(handler)
    log.setLevel(min(level, logging.INFO))
    log.propagate = False
    return handler
