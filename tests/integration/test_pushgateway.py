"""Pushgateway outcomes of scan and train runs, against a real Pushgateway (Debian's)."""

from __future__ import annotations

import secrets

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from helpers.promserver import pushgateway_server, scrape
from helpers.recorders import INFO, record, scan_telemetry
from ray_inspect import telemetry as t


@pytest.fixture(scope="module")
def pushgateway():
    with pushgateway_server() as url:
        yield url


def pushed(url: str, job: str, pipeline: str) -> dict[tuple[str, tuple], float]:
    """The samples the Pushgateway holds in group job/pipeline: {(name, labels): value}."""
    out = {}
    for fam in text_string_to_metric_families(scrape(f"{url}/metrics")):
        for s in fam.samples:
            if s.labels.get("job") == job and s.labels.get("pipeline") == pipeline:
                labels = tuple(sorted((k, v) for k, v in s.labels.items()
                                      if k not in ("job", "pipeline", "instance")))
                out[(s.name, labels)] = s.value
    return out


def test_pushgateway_failed_run_never_overwrites_last_success(pushgateway):
    pipeline = "line-" + secrets.token_hex(3)
    tel, _ = scan_telemetry(t.Pusher(pushgateway, "ray_inspect_scan", pipeline))
    tel.start(INFO)
    for tiles in (10, 20):
        tel.image(record(tiles))
    tel.finish({}, ok=True)
    first = pushed(pushgateway, "ray_inspect_scan", pipeline)
    success = first[("ray_inspect_scan_last_success_timestamp_seconds", ())]
    assert first[("ray_inspect_scan_last_run_success", ())] == 1
    assert first[("ray_inspect_scan_last_run_images", (("result", "scanned"),))] == 2
    assert first[("ray_inspect_scan_last_run_tiles", ())] == 30
    assert first[("ray_inspect_scan_duration_seconds", ())] >= 0
    settings = ("version", "model_fingerprint", "stride", "precision", "workers", "threshold")
    info = {**{k: str(INFO[k]) for k in settings}, "run_id": "run-1"}
    assert first[("ray_inspect_scan_info", tuple(sorted(info.items())))] == 1

    tel.start({**INFO, "run_id": "run-2"})                 # the next night: it fails
    tel.failed("worker_died")
    tel.finish({}, ok=False)
    second = pushed(pushgateway, "ray_inspect_scan", pipeline)
    assert second[("ray_inspect_scan_last_run_success", ())] == 0
    assert second[("ray_inspect_scan_last_success_timestamp_seconds", ())] == success
    assert second[("ray_inspect_scan_last_run_images", (("result", "scanned"),))] == 0
    assert second[("ray_inspect_scan_last_run_images", (("result", "failed"),))] == 1
    assert not any(k[0] == "ray_inspect_scan_info" and ("run_id", "run-1") in k[1] for k in second)

    tel.start({**INFO, "run_id": "run-3"})                 # and recovers
    tel.image(record(7))
    tel.finish({}, ok=True)
    third = pushed(pushgateway, "ray_inspect_scan", pipeline)
    assert third[("ray_inspect_scan_last_run_success", ())] == 1
    assert third[("ray_inspect_scan_last_success_timestamp_seconds", ())] > success


def test_pushgateway_train_outcome_has_its_own_group(pushgateway):
    pipeline = "line-" + secrets.token_hex(3)
    tel = t.Telemetry(t.TelemetryConfig(pushgateway=pushgateway, pipeline=pipeline), CollectorRegistry())
    train = tel.train()
    train.start({"epochs": 2, "loss": "ssim"})
    train.epoch({"epoch": 1, "loss": 0.25, "patches": 64, "seconds": 1.0, "patches_per_s": 64.0,
                 "workers": 1})
    train.finish({}, ok=True)
    got = pushed(pushgateway, "ray_inspect_train", pipeline)
    assert got[("ray_inspect_train_last_run_success", ())] == 1
    assert got[("ray_inspect_train_last_run_epochs", ())] == 1
    assert got[("ray_inspect_train_last_run_loss", ())] == 0.25
    assert ("ray_inspect_train_last_success_timestamp_seconds", ()) in got
    assert pushed(pushgateway, "ray_inspect_scan", pipeline) == {}


