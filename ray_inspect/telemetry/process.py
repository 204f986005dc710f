"""The telemetry of this process: its metrics server, where runs push, how it logs.

``configure`` builds it from the command-line options; ``current`` is what it built last. A
``Telemetry`` hands out the per-run recorders: no-op ones without a metrics port or a Pushgateway.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any

from prometheus_client import CollectorRegistry

from ray_inspect.config import TelemetryConfig
from ray_inspect.telemetry.families import ScanMetrics, TrainMetrics, families
from ray_inspect.telemetry.logs import configure_logging, extra_fields, log, redact
from ray_inspect.telemetry.push import Pusher
from ray_inspect.telemetry.recorders import (
    NULL_SCAN,
    NULL_TRAIN,
    ScanRecorder,
    ScanTelemetry,
    TrainRecorder,
    TrainTelemetry,
)

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


class _Labelled:
    """Every sample of a registry with labels added (the pipeline), so that the series of several
    production lines stay apart wherever they are scraped."""

    def __init__(self, registry: CollectorRegistry, labels: dict[str, str]):
        self.registry, self.labels = registry, labels

    def collect(self):
        from prometheus_client.metrics_core import Metric

        for family in self.registry.collect():
            out = Metric(family.name, family.documentation, family.type, family.unit)
            out.samples = [s._replace(labels={**s.labels, **self.labels}) for s in family.samples]
            yield out


class Telemetry:
    """One process's telemetry: serves its registry on the metrics port (started on first use) and
    hands out per-run recorders."""

    def __init__(self, cfg: TelemetryConfig = TelemetryConfig(), registry: CollectorRegistry | None = None):
        self.cfg = cfg
        self.registry = registry if registry is not None else _process_registry()

    @staticmethod
    def disabled() -> Telemetry:
        return Telemetry(TelemetryConfig(), CollectorRegistry())

    @property
    def enabled(self) -> bool:
        return self.cfg.metrics_port > 0 or bool(self.cfg.pushgateway)

    def _server_key(self) -> tuple[str, int, int]:
        return (self.cfg.metrics_bind, self.cfg.metrics_port, id(self.registry))

    def serve(self) -> int | None:
        """Start the HTTP exposition on ``metrics_bind:metrics_port`` once per process, every series
        labelled with the pipeline; returns the port."""
        port, bind = self.cfg.metrics_port, self.cfg.metrics_bind
        if port <= 0:
            return None
        key = self._server_key()
        with _SERVERS_LOCK:
            if key not in _SERVERS:
                from prometheus_client import start_http_server

                exposed = CollectorRegistry(auto_describe=False)
                exposed.register(_Labelled(self.registry, {"pipeline": self.cfg.pipeline}))
                try:
                    _SERVERS[key] = start_http_server(port, addr=bind, registry=exposed)
                except OSError as exc:
                    raise ValueError(f"--metrics-port {port} on {bind}: {exc.strerror or exc}") from None
                log.info("metrics on http://%s:%d/metrics", bind, port)
        return port

    def close(self) -> None:
        """Stop this telemetry's HTTP server (tests; a command's server lives as long as the process)."""
        with _SERVERS_LOCK:
            server = _SERVERS.pop(self._server_key(), None)
        if server is not None:
            server[0].shutdown()
            server[0].server_close()

    def _pusher(self, job: str) -> Pusher | None:
        return Pusher(self.cfg.pushgateway, job, self.cfg.pipeline) if self.cfg.pushgateway else None

    def scan(self) -> ScanRecorder:
        """The recorder for one scan (a no-op one when metrics are off)."""
        if not self.enabled:
            return NULL_SCAN
        self.serve()
        return ScanTelemetry(families(self.registry, ScanMetrics), self._pusher("ray_inspect_scan"))

    def train(self) -> TrainRecorder:
        """The recorder for one training run (a no-op one when metrics are off)."""
        if not self.enabled:
            return NULL_TRAIN
        self.serve()
        return TrainTelemetry(families(self.registry, TrainMetrics), self._pusher("ray_inspect_train"))

    def say(self, message: str, level: int = logging.INFO, key: str | None = None, **fields: Any) -> None:
        """A progress line: plain text on stderr, or one JSON log record with ``--log-format json``."""
        if self.cfg.log_format == "json":
            log.log(level, message, extra=extra_fields({**fields, **({"key": key} if key else {})}))
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
