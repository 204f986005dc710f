"""Telemetry without Ray: metric values, exposure, Pushgateway outcome, JSON logs without credentials."""

from __future__ import annotations

import io
import json
import logging
import secrets
import socket

import pytest
from prometheus_client import CollectorRegistry

from helpers.promserver import scrape
from helpers.recorders import INFO, record, scan_telemetry
from helpers.s3server import free_ports
from ray_inspect import telemetry as t
from ray_inspect.records import FailureKind


def test_scan_counts_every_event_once():
    tel, reg = scan_telemetry()
    v = reg.get_sample_value
    tel.start(INFO)
    tel.listed(6, 2, complete=False)
    assert v("ray_inspect_scan_images", {"state": "listed"}) == 6
    tel.listed(10, 3, complete=True)
    tel.actors(2)
    tel.in_flight(4)
    assert v("ray_inspect_scan_actors") == 2 and v("ray_inspect_images_in_flight") == 4
    assert v("ray_inspect_scan_images", {"state": "to_scan"}) == 7
    assert v("ray_inspect_scan_images", {"state": "skipped"}) == 3
    assert v("ray_inspect_scan_images", {"state": "done"}) == 0
    for tiles in (49, 36, 36, 81):
        tel.image(record(tiles))
    tel.image(record(10, inference=0.5, gpu_magic=1.0))   # unknown stages are not labels
    tel.failed("corrupt")
    tel.failed(FailureKind.WORKER_DIED)
    tel.failed("a file name.png")                          # free text never becomes a label value
    assert v("ray_inspect_images_scanned_total") == 5
    assert v("ray_inspect_tiles_processed_total") == 49 + 36 + 36 + 81 + 10
    assert v("ray_inspect_read_bytes_total") == 5 * 1000 + 212
    assert v("ray_inspect_written_bytes_total") == 5 * 500 + 212
    assert v("ray_inspect_images_failed_total", {"reason": "corrupt"}) == 1
    assert v("ray_inspect_images_failed_total", {"reason": "worker_died"}) == 1
    assert v("ray_inspect_images_failed_total", {"reason": "other"}) == 1
    assert v("ray_inspect_images_failed_total", {"reason": "mask"}) == 0   # every reason exists at start
    assert v("ray_inspect_stage_duration_seconds_count", {"stage": "inference"}) == 5
    assert v("ray_inspect_stage_duration_seconds_count", {"stage": "read"}) == 4
    assert v("ray_inspect_stage_duration_seconds_sum", {"stage": "inference"}) == pytest.approx(4 * 0.3 + 0.5)
    assert v("ray_inspect_stage_duration_seconds_bucket", {"stage": "inference", "le": "0.25"}) == 0
    assert v("ray_inspect_stage_duration_seconds_bucket", {"stage": "inference", "le": "0.5"}) == 5
    assert "gpu_magic" not in scrape_registry(reg)
    assert v("ray_inspect_scan_images", {"state": "done"}) == 8
    info = {"model_fingerprint": "f00d", "precision": "bfloat16", "run_id": "run-1", "stride": "30",
            "threshold": "0.25", "version": "9.9.9", "workers": "2"}
    assert v("ray_inspect_scan_info", info) == 1
    assert v("ray_inspect_scan_last_success_timestamp_seconds") is None       # absent until a success
    assert v("ray_inspect_scan_last_run_success") is None
    assert 0 <= v("ray_inspect_scan_duration_seconds") < 5                    # elapsed while running
    tel.finish({"exit_code": 3}, ok=True)
    assert v("ray_inspect_scan_last_run_success") == 1
    assert v("ray_inspect_scan_last_run_images", {"result": "scanned"}) == 5
    assert v("ray_inspect_scan_last_run_images", {"result": "failed"}) == 3
    assert v("ray_inspect_scan_last_run_images", {"result": "skipped"}) == 3
    assert v("ray_inspect_scan_last_run_tiles") == 212
    assert v("ray_inspect_scan_last_success_timestamp_seconds") \
        >= v("ray_inspect_scan_start_timestamp_seconds")
    assert v("ray_inspect_scan_actors") == 0 and v("ray_inspect_images_in_flight") == 0


def scrape_registry(reg: CollectorRegistry) -> str:
    from prometheus_client import generate_latest

    return generate_latest(reg).decode()


def test_failed_run_keeps_the_last_success_and_a_new_run_starts_from_zero():
    tel, reg = scan_telemetry()
    v = reg.get_sample_value
    tel.start(INFO)
    tel.image(record(5))
    tel.finish({}, ok=True)
    success = v("ray_inspect_scan_last_success_timestamp_seconds")
    tel.start({**INFO, "run_id": "run-2"})
    assert v("ray_inspect_scan_images", {"state": "done"}) == 0
    settings = ("model_fingerprint", "precision", "stride", "threshold", "version", "workers")
    old_labels = dict.fromkeys(settings, "")
    assert v("ray_inspect_scan_info", {**old_labels, "run_id": "run-1"}) is None
    tel.failed("read")
    tel.finish({}, ok=False)
    assert v("ray_inspect_scan_last_run_success") == 0
    assert v("ray_inspect_scan_last_success_timestamp_seconds") == success
    assert v("ray_inspect_scan_last_run_images", {"result": "scanned"}) == 0
    assert v("ray_inspect_scan_last_run_images", {"result": "failed"}) == 1
    assert v("ray_inspect_images_scanned_total") == 1                          # counters never go back


def test_disabled_telemetry_is_a_no_op():
    tel = t.Telemetry(t.TelemetryConfig())                 # no port, no Pushgateway: what a library call gets
    assert not tel.enabled
    scan, train = tel.scan(), tel.train()
    assert scan is t.ScanTelemetry.disabled() and train is t.TrainTelemetry.disabled()
    assert not scan.enabled and not train.enabled
    scan.start(INFO)
    scan.image(record(3))
    scan.failed("corrupt")
    scan.finish({}, ok=True)
    train.start({"epochs": 2})
    train.epoch({"epoch": 1, "loss": 0.5, "patches": 10, "seconds": 1.0})
    train.finish({}, ok=True)
    assert scan.counts() == {}
    assert "ray_inspect_" not in scrape_registry(t.PROCESS_REGISTRY)   # nothing was registered on the way


def test_one_recorder_contract_for_the_real_and_the_null_recorders():
    tel, _ = scan_telemetry()
    assert isinstance(tel, t.ScanRecorder) and isinstance(t.NULL_SCAN, t.ScanRecorder)
    assert isinstance(t.TrainTelemetry(t.TrainMetrics(CollectorRegistry())), t.TrainRecorder)
    assert isinstance(t.NULL_TRAIN, t.TrainRecorder) and not t.NULL_TRAIN.enabled


def test_failure_reasons_are_the_failure_kinds_in_order():
    _, reg = scan_telemetry()
    (family,) = [m for m in reg.collect() if m.name == "ray_inspect_images_failed"]
    reasons = [s.labels["reason"] for s in family.samples if s.name == "ray_inspect_images_failed_total"]
    assert reasons == [k.value for k in FailureKind] == [   # the words dashboards and alerts know
        "empty", "corrupt", "unreadable", "mode", "nan", "range", "size", "mask", "invalid", "read", "decode",
        "format", "missing", "storage", "worker_died", "timeout", "internal", "other"]


def test_train_metrics():
    reg = CollectorRegistry()
    tel = t.TrainTelemetry(t.TrainMetrics(reg))
    v = reg.get_sample_value
    tel.start({"loss": "ssim", "latent": 16, "epochs": 3, "workers": 2, "run_name": "r", "run_id": "tr-1"})
    assert v("ray_inspect_train_loss") is None and v("ray_inspect_train_epochs") == 3
    tel.epoch({"epoch": 1, "loss": 0.4, "patches": 256, "seconds": 2.0, "patches_per_s": 128.0, "workers": 2,
               "checkpoint_seconds": 0.3})
    tel.epoch({"epoch": 2, "loss": 0.3, "patches": 256, "seconds": 4.0, "patches_per_s": 64.0, "workers": 2})
    assert v("ray_inspect_train_patches_total") == 512
    assert v("ray_inspect_train_loss") == pytest.approx(0.3) and v("ray_inspect_train_epoch") == 2
    assert v("ray_inspect_train_patches_per_second") == 64 and v("ray_inspect_train_workers") == 2
    assert v("ray_inspect_train_epoch_duration_seconds_count") == 2
    assert v("ray_inspect_train_epoch_duration_seconds_sum") == 6
    assert v("ray_inspect_train_checkpoint_duration_seconds_count") == 1
    assert v("ray_inspect_train_checkpoint_duration_seconds_sum") == pytest.approx(0.3)
    assert v("ray_inspect_train_info", {"loss": "ssim", "latent": "16", "epochs": "3", "workers": "2",
                                        "run_name": "r", "run_id": "tr-1", "version": t.version()}) == 1
    tel.finish({"final_loss": 0.3}, ok=True)
    assert v("ray_inspect_train_last_run_epochs") == 2
    assert v("ray_inspect_train_last_run_loss") == pytest.approx(0.3)
    assert v("ray_inspect_train_last_success_timestamp_seconds") > 0


def test_metrics_port_serves_on_the_bind_address_only():
    (port,) = free_ports(1)
    cfg = t.TelemetryConfig(metrics_port=port, metrics_bind="127.0.0.1", pipeline="line-7")
    tel = t.Telemetry(cfg, CollectorRegistry())
    scan = tel.scan()                                      # the server starts with the first recorder
    try:
        scan.start(INFO)
        scan.image(record(42))
        text = scrape(f"http://127.0.0.1:{port}/metrics")
        assert 'ray_inspect_tiles_processed_total{pipeline="line-7"} 42.0' in text
        samples = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
        assert samples and all('pipeline="line-7"' in ln for ln in samples)   # every series, its line
        assert "_created" not in text                      # no *_created twins of every counter
        with socket.socket() as s:                         # bound to 127.0.0.1, not to every interface
            assert s.connect_ex((_other_local_address(), port)) != 0
        other = t.Telemetry(t.TelemetryConfig(metrics_port=port), CollectorRegistry())
        with pytest.raises(ValueError, match=f"--metrics-port {port}"):
            other.scan()                                   # port taken: one line, not a traceback
    finally:
        tel.close()


def _other_local_address() -> str:
    """An address of this machine other than 127.0.0.1 (127.0.0.2 is loopback too on Linux)."""
    return "127.0.0.2"


# ---------------------------------------------------------------- Pushgateway (a real one)

def test_unreachable_pushgateway_does_not_fail_the_run(caplog):
    (port,) = free_ports(1)
    pusher = t.Pusher(f"http://user:hunter2pass@127.0.0.1:{port}", "ray_inspect_scan", timeout=2)
    tel, reg = scan_telemetry(pusher)
    tel.start(INFO)
    with caplog.at_level(logging.WARNING, logger="ray_inspect"):
        t.log.propagate = True
        try:
            tel.finish({}, ok=True)
        finally:
            t.log.propagate = False
    assert reg.get_sample_value("ray_inspect_scan_last_run_success") == 1
    assert any("Pushgateway failed" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------- logging

@pytest.fixture
def json_log():
    buf = io.StringIO()
    handler = t.configure_logging("json", stream=buf)
    yield buf
    t.log.removeHandler(handler)
    t.set_run_id(None)


def lines(buf: io.StringIO) -> list[dict]:
    return [json.loads(ln) for ln in buf.getvalue().splitlines()]


def test_json_log_records_carry_run_id_and_image_key(json_log):
    tel, _ = scan_telemetry()
    tel.start(INFO)
    tel.listed(10, 3, complete=True)
    log = logging.getLogger("ray_inspect.distributed.scan")
    log.warning("skipped %s: %s", "a/b.png", "corrupt", extra={"key": "a/b.png", "kind": "corrupt"})
    with t.image_key("c/d.png"):
        log.info("scanned")
    tel.finish({}, ok=True)
    recs = lines(json_log)
    assert [r["message"] for r in recs[:4]] == ["scan started with 2 worker(s); listing the source",
                                                "listing finished: 10 images, 7 to scan, 3 already done",
                                                "skipped a/b.png: corrupt", "scanned"]
    del recs[1]
    assert recs[3]["message"].startswith("scan finished after ") and recs[3]["message"].endswith(
        ": 0 scanned, 0 failed, 0 tiles")
    assert all(r["run_id"] == "run-1" for r in recs)
    assert all(set(r) >= {"time", "level", "logger", "message"} for r in recs)
    assert recs[1]["key"] == "a/b.png" and recs[1]["level"] == "warning"
    assert recs[1]["logger"] == "ray_inspect.distributed.scan"
    assert recs[1]["kind"] == "corrupt" and recs[2]["key"] == "c/d.png" and "key" not in recs[3]
    assert recs[0]["model_fingerprint"] == "f00d" and recs[3]["ok"] is True
    assert recs[0]["time"].endswith("+00:00")


def test_credentials_never_reach_the_log(json_log, monkeypatch):
    secret = secrets.token_urlsafe(30) + "/+x"
    key_id = "AKIA" + secrets.token_hex(8).upper()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SESSION_TOKEN", "tok-" + secrets.token_hex(12))
    log = logging.getLogger("ray_inspect.io.storage")
    log.error("cannot sign with %s / %s", key_id, secret, extra={"detail": f"secret={secret}"})
    log.warning("push to http://admin:pa55word@pgw:9091 failed; aws_secret_access_key = hunter2hunter2")
    try:
        raise RuntimeError(f"botocore said {secret} and {key_id}")
    except RuntimeError:
        log.exception("upload failed")
    text = json_log.getvalue()
    for leaked in (secret, key_id, "pa55word", "hunter2hunter2", secret.split("/")[0]):
        assert leaked not in text
    recs = lines(json_log)
    assert recs[0]["message"] == "cannot sign with *** / ***" and recs[0]["detail"] == "secret=***"
    assert "http://***@pgw:9091" in recs[1]["message"]
    assert "RuntimeError: botocore said *** and ***" in recs[2]["exception"]


def test_text_log_is_redacted_too(monkeypatch):
    secret = secrets.token_urlsafe(24)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    buf = io.StringIO()
    handler = t.configure_logging("text", stream=buf)
    try:
        logging.getLogger("ray_inspect").info("quiet in text mode")
        logging.getLogger("ray_inspect").warning("key %s", secret)
    finally:
        t.log.removeHandler(handler)
    assert buf.getvalue() == "ray-inspect: warning: key ***\n"


def test_cli_options_configure_telemetry(monkeypatch):
    from click.testing import CliRunner

    from ray_inspect.cli import main

    seen = {}
    monkeypatch.setattr(t, "configure", lambda *a: seen.setdefault("args", a) and t.Telemetry.disabled())
    res = CliRunner().invoke(main, ["--metrics-port", "9400", "--metrics-bind", "0.0.0.0", "--pushgateway",
                                    "http://pgw:9091", "--log-format", "json", "report", "--help"])
    assert res.exit_code == 0, res.output
    assert seen["args"] == (9400, "0.0.0.0", "http://pgw:9091", "json")
    res = CliRunner().invoke(main, ["--log-format", "xml", "report", "--help"])
    assert res.exit_code == 2 and "xml" in res.output


def test_a_scan_that_fails_before_it_starts_is_counted_with_its_reason():
    """No start (the model did not load): the run still ends as failed, counted by reason, and the
    last run's reason is 1 for that reason and 0 for the others."""
    tel, reg = scan_telemetry()
    tel.finish({"failure": "model", "error": "/m: not a model directory"}, ok=False)
    tel.finish({"failure": "no such stage"}, ok=False)                  # unknown: internal
    v = reg.get_sample_value
    assert v("ray_inspect_scan_runs_failed_total", {"reason": "model"}) == 1
    assert v("ray_inspect_scan_runs_failed_total", {"reason": "internal"}) == 1
    assert v("ray_inspect_scan_runs_failed_total", {"reason": "source"}) == 0
    assert v("ray_inspect_scan_last_run_success") == 0
    assert v("ray_inspect_scan_last_run_failure", {"reason": "internal"}) == 1
    assert v("ray_inspect_scan_last_run_failure", {"reason": "model"}) == 0
    assert v("ray_inspect_scan_last_success_timestamp_seconds") is None


def test_a_scan_whose_model_or_source_fails_is_a_failed_run_with_that_reason(tmp_path):
    """scan() records the run as failed, by stage, before Ray is even needed."""
    from PIL import Image

    from ray_inspect.config import ModelConfig
    from ray_inspect.core.model import build_model
    from ray_inspect.distributed.scan import scan
    from ray_inspect.io.artifact import ModelCard, save_model

    tel, reg = scan_telemetry()
    with pytest.raises((ValueError, OSError)):
        scan(str(tmp_path / "no-model"), str(tmp_path), str(tmp_path / "out"), telemetry=tel)
    model = str(tmp_path / "model")
    save_model(model, build_model(ModelConfig()), ModelCard(model=ModelConfig(), resize=None))
    (tmp_path / "empty").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "empty" / "notes.txt", format="PNG")   # no image names
    with pytest.raises(FileNotFoundError):
        scan(model, str(tmp_path / "empty"), str(tmp_path / "out"), telemetry=tel)
    v = reg.get_sample_value
    assert v("ray_inspect_scan_runs_failed_total", {"reason": "model"}) == 1
    assert v("ray_inspect_scan_runs_failed_total", {"reason": "source"}) == 1
    assert v("ray_inspect_scan_last_run_failure", {"reason": "source"}) == 1
    assert v("ray_inspect_scan_last_run_success") == 0
