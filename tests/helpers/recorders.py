"""Scan-recorder inputs shared by the telemetry tests: run settings, per-image records, a recorder."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from ray_inspect import telemetry as t
from ray_inspect.records import ImageRecord, Outcome

INFO = {"run_id": "run-1", "version": "9.9.9", "model_fingerprint": "f00d", "stride": 30,
        "precision": "bfloat16", "workers": 2, "threshold": 0.25}
STAGE_SECONDS = {"read": 0.002, "inference": 0.3, "residual": 0.02, "segment": 0.01, "write": 0.004}


def record(tiles: int, **timings: float) -> ImageRecord:
    """A scanned image's record with ``tiles`` windows, 1000 + tiles bytes read, 500 + tiles written,
    and ``timings`` per stage (default: STAGE_SECONDS)."""
    key = f"test/good/{tiles:03d}.png"
    return ImageRecord(
        key=key, stem=key.removesuffix(".png"), url=f"/data/{key}", version="1700000000.0-1000",
        status=Outcome.OK, fingerprint="0123456789abcdef", defect_type="good", mask_url=None, score=0.125,
        height=256, width=256, tiles=tiles, bands=1, threshold=0.25, bytes_read=1000 + tiles,
        max_rss_bytes=1 << 28, bytes_written=500 + tiles, timings=timings or dict(STAGE_SECONDS),
        worker="node-1:4242", finished=1700000001.0)


def scan_telemetry(pusher: t.Pusher | None = None) -> tuple[t.ScanTelemetry, CollectorRegistry]:
    reg = CollectorRegistry()
    return t.ScanTelemetry(t.ScanMetrics(reg), pusher), reg
