"""Scan throughput with metrics on vs off (issue: within 3 %), as ratios within one run.

The same Ray scan (``ray_inspect.distributed.scan.scan``) runs with telemetry off (the no-op recorder) and on
(a live metrics port scraped every second, as Prometheus would, plus the per-image counters and
histograms). Rounds alternate off/on/on/off/... so that drift of the machine's speed cancels; each
pair gives a ratio and the median pair is reported. Throughput counts from the first finished image
to the last. Prints JSON; docs/monitoring.md records it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from datetime import date

import torch
from prometheus_client import CollectorRegistry

from ray_inspect.config import InspectConfig, ModelConfig, ScanOptions, SynthConfig, TelemetryConfig
from ray_inspect.core.model import ConvAE
from ray_inspect.distributed.cluster import ensure_ray
from ray_inspect.distributed.scan import scan
from ray_inspect.io.artifact import ModelCard, save_model
from ray_inspect.io.synth import generate
from ray_inspect.records import ImageRecord, Outcome
from ray_inspect.telemetry import Telemetry


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Scraper:
    """Fetches /metrics every ``interval`` seconds while running (what Prometheus does to the driver)."""

    def __init__(self, port: int, interval: float = 1.0):
        self.url, self.interval, self.scrapes = f"http://127.0.0.1:{port}/metrics", interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with urllib.request.urlopen(self.url, timeout=5) as r:   # noqa: S310 - 127.0.0.1
                r.read()
            self.scrapes += 1

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def recorder_cost(n: int = 20_000) -> float:
    """Seconds the driver spends per image in the recorder (``image()`` with five stage timings and a
    progress update): a bound on the overhead that machine noise cannot blur."""
    from ray_inspect.telemetry import ScanMetrics, ScanTelemetry

    tel = ScanTelemetry(ScanMetrics(CollectorRegistry()))
    tel.start({"run_id": "bench", "images_total": n, "to_scan": n})
    rec = ImageRecord(
        key="good/000.png", stem="good/000", url="/data/good/000.png", version="1", status=Outcome.OK,
        fingerprint="bench", defect_type="good", mask_url=None, score=0.1, height=1024, width=1024, tiles=961,
        bands=1, threshold=0.5, bytes_read=1 << 20, max_rss_bytes=1 << 30, bytes_written=1 << 19,
        timings={"read": 0.02, "inference": 0.35, "residual": 0.03, "segment": 0.02, "write": 0.01})
    t0 = time.perf_counter()
    for i in range(n):
        tel.in_flight(i % 4)
        tel.image(rec)
    return (time.perf_counter() - t0) / n


def _model_and_images(work: str, images: int, size: int) -> tuple[str, str]:
    """(an untrained SSIM-AE model directory, a folder of ``images`` defect-free images) under ``work``."""
    generate(os.path.join(work, "data"), SynthConfig(size=size, train=0, validation=0, test_good=images,
                                                     test_defective=0))
    torch.manual_seed(0)
    model = os.path.join(work, "model")
    save_model(model, ConvAE(ModelConfig()), ModelCard(model=ModelConfig(), resize=None, threshold=0.5))
    return model, os.path.join(work, "data", "test", "good")


def _alternating(run: Callable[[bool, int], float], pairs: int) -> list[dict]:
    """Rounds off/on, on/off, ...: one {off, on, ratio} per pair, so that drift cancels."""
    rounds: list[dict] = []
    for p in range(pairs):
        order = (False, True) if p % 2 == 0 else (True, False)
        rates = {on: run(on, 2 * p + k) for k, on in enumerate(order)}
        rounds.append({"off": rates[False], "on": rates[True], "ratio": rates[True] / rates[False]})
    return rounds


def _summary(a: argparse.Namespace, rounds: list[dict], scrapes: int, per_image: float) -> dict:
    ratios = sorted(r["ratio"] for r in rounds)
    off = sum(r["off"] for r in rounds) / len(rounds)
    on = sum(r["on"] for r in rounds) / len(rounds)
    return {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "images_per_round": a.images, "image": f"{a.size}x{a.size}", "pairs": a.pairs, "scrapes": scrapes,
        "images_per_s_off": round(off, 3), "images_per_s_on": round(on, 3),
        "pair_ratios_on_to_off": [round(r, 4) for r in ratios],
        "median_ratio_on_to_off": round(statistics.median(ratios), 4),
        "mean_ratio_on_to_off": round(on / off, 4),
        "within_3_percent": abs(statistics.median(ratios) - 1) <= 0.03,
        "recorder_us_per_image": round(per_image * 1e6, 1),
        "recorder_share_of_driver_time": round(per_image * off, 6),   # seconds recording per second of scan
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--pairs", type=int, default=4, help="off/on pairs (rounds = 2 x pairs)")
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="ri-metrics-bench-")
    model, src = _model_and_images(work, a.images, a.size)
    ensure_ray(num_cpus=os.cpu_count())
    port = free_port()
    telemetry = Telemetry(TelemetryConfig(metrics_port=port), CollectorRegistry())
    cfg, opts = InspectConfig(), ScanOptions(force=True)

    def run(on: bool, i: int) -> float:
        """Images/s from the first finished image to the last (actor start-up and model loading,
        the same with or without metrics, are left out: they only add noise)."""
        stamps: list[float] = []
        s = scan(model, src, os.path.join(work, f"out{i}"), cfg, options=opts,
                 telemetry=telemetry.scan() if on else None,
                 progress=lambda *_: stamps.append(time.perf_counter()))
        assert s["scanned"] == a.images, s
        return (len(stamps) - 1) / (stamps[-1] - stamps[0])

    run(False, -1)                                             # warm-up: Ray workers, page cache
    telemetry.serve()
    with Scraper(port) as scraper:
        rounds = _alternating(run, a.pairs)
    telemetry.close()
    print(json.dumps(_summary(a, rounds, scraper.scrapes, recorder_cost()), indent=2))


if __name__ == "__main__":
    main()
