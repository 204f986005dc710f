"""Scan-recorder inputs shared by the telemetry tests: run settings, per-image records, a recorder."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from ray_inspect import telemetry as t

INFO = {"run_id": "run-1", "version": "9.9.9", "model_fingerprint": "f00d", "stride": 30, "precision": "bfloat16",
        "workers": 2, "images_total": 10, "to_scan": 7, "skipped": 3, "threshold": 0.25}


def record(tiles: int, **timings: float) -> dict:
    return {"status": "ok", "tiles": tiles, "bytes_read": 1000 + tiles, "bytes_written": 500 + tiles,
            "timings": timings or {"read": 0.002, "inference": 0.3, "residual": 0.02, "segment": 0.01, "write": 0.004}}


def scan_telemetry(pusher: t.Pusher | None = None) -> tuple[t.ScanTelemetry, CollectorRegistry]:
    reg = CollectorRegistry()
    return t.ScanTelemetry(t.ScanMetrics(reg), pusher), reg
