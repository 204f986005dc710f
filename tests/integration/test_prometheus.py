"""Against a real Prometheus: the alert rules (promtool) and the dashboard on a real train and scan."""

from __future__ import annotations

import glob
import json
import os
import secrets
import shutil
import subprocess
import sys
import time

import pytest
from prometheus_client import CollectorRegistry

from helpers.promserver import binary, prometheus_server, pushgateway_server
from helpers.s3server import free_ports
from ray_inspect.config import TelemetryConfig
from ray_inspect.telemetry import Telemetry

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RULES = os.path.join(ROOT, "charts", "ray-inspect", "files", "alert-rules.yaml")
RULE_TESTS = os.path.join(ROOT, "monitoring", "alert-rules.test.yaml")
DASHBOARD = os.path.join(ROOT, "charts", "ray-inspect", "files", "grafana-dashboard.json")
RATE_INTERVAL = "10s"   # what Grafana's $__rate_interval would be here: several 1 s scrapes
PIPELINE = "prom-test"


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([binary("promtool"), *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_alert_rules_pass_promtool_check():
    res = promtool("check", "rules", RULES)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS: 6 rules found" in res.stdout


def test_alert_rules_unit_tests():
    res = promtool("test", "rules", RULE_TESTS)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query of the dashboard, panels inside rows included."""
    with open(DASHBOARD) as f:
        dash = json.load(f)
    out = []
    for panel in dash["panels"] + [p for row in dash["panels"] for p in row.get("panels", [])]:
        out += [(panel["title"], t["expr"]) for t in panel.get("targets", [])]
    return out


def test_dashboard_covers_the_issue():
    exprs = " ".join(e for _, e in dashboard_exprs())
    for metric in ("ray_inspect_images_scanned_total", "ray_inspect_images_failed_total",
                   "ray_inspect_tiles_processed_total", "ray_inspect_stage_duration_seconds_bucket",
                   "ray_inspect_scan_images", "ray_inspect_scan_last_success_timestamp_seconds",
                   "ray_inspect_train_loss", "ray_inspect_train_patches_per_second",
                   "ray_inspect_train_checkpoint_duration_seconds_sum", "ray_inspect_storage_retries_total"):
        assert metric in exprs, metric
    assert "histogram_quantile(0.95" in exprs
    every = [e for _, e in dashboard_exprs()]                 # the pipeline variable selects every query
    assert all(e.count("ray_inspect_") == e.count('pipeline=~"$pipeline"') for e in every)


def scan_source(dataset: str, dest: str, copies: int = 3) -> int:
    """A flat folder: the data set's test images ``copies`` times and one corrupt PNG; returns the
    number of good images."""
    os.makedirs(dest)
    images = sorted(glob.glob(os.path.join(dataset, "test", "*", "*.png")))
    for c in range(copies):
        for i, path in enumerate(images):
            shutil.copy(path, os.path.join(dest, f"c{c}-{i:03d}.png"))
    with open(os.path.join(dest, "zz-corrupt.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    return copies * len(images)


def records_tiles(out: str) -> list[int]:
    return [json.load(open(p))["tiles"] for p in glob.glob(os.path.join(out, "records", "**", "*.json"),
                                                           recursive=True)]


def value(prom, expr: str) -> float:
    res = prom.query(expr)
    assert len(res) == 1, (expr, res)
    return float(res[0]["value"][1])


@pytest.mark.slow
def test_real_prometheus_scrapes_train_and_scan(patches, dataset, tmp_path, request):
    from ray_inspect.distributed import scan as fleet

    train_port, scan_port = free_ports(2)
    drivers = [f"127.0.0.1:{train_port}", f"127.0.0.1:{scan_port}"]
    with pushgateway_server() as pushgateway, \
            prometheus_server({"ray-inspect": drivers, "pushgateway": [pushgateway.split("//")[1]]},
                              honor_labels=("pushgateway",)) as prom:
        prom.wait('up{job="pushgateway"} == 1', timeout=60)          # the first scrape has landed
        t0 = time.time() - 2

        # Training: the command line in its own process (its own local Ray), as a RayJob runs it.
        secret = secrets.token_urlsafe(30)
        env = {**os.environ, "RAY_ADDRESS": "", "AWS_SECRET_ACCESS_KEY": secret,
               "RAY_INSPECT_PIPELINE": PIPELINE}
        model = str(tmp_path / "model")
        res = subprocess.run(
            [sys.executable, "-m", "ray_inspect.cli", "--metrics-port", str(train_port),
             "--pushgateway", pushgateway, "--log-format", "json",
             "train", patches, model, "--latent", "16", "--epochs", "2", "--batch-size", "32",
             "--workers", "1", "--storage", str(tmp_path / "runs"), "--run-name", "prom"],
            env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        assert secret not in res.stdout + res.stderr
        # A JSON record is one write; Ray's forwarded worker lines are not (print writes the text,
        # then the newline), so a record may follow a worker line's text on the same line.
        logs = [json.loads(ln[ln.index('{"time"'):]) for ln in res.stderr.splitlines() if '{"time"' in ln]
        epochs = [r for r in logs if r["message"].startswith("epoch ") and "progress" not in r]
        assert [r["epoch"] for r in epochs] == [1, 2]
        within = [r for r in logs if "progress" in r]     # progress within an epoch, on a slow machine
        assert all(r["progress"] in ("epoch 1/2", "epoch 2/2") and r["done"] <= r["total"] for r in within)
        assert logs[0]["message"] == f"metrics on http://127.0.0.1:{train_port}/metrics"   # before the run
        assert len({r["run_id"] for r in logs[1:]}) == 1
        assert all(r["logger"].startswith("ray_inspect") for r in logs)
        assert logs[-1]["message"].startswith("training finished") and logs[-1]["ok"] is True
        pushed = f'job="ray_inspect_train", pipeline="{PIPELINE}"'
        prom.wait(f"ray_inspect_train_last_run_success{{{pushed}}} == 1")
        assert value(prom, f'ray_inspect_train_last_run_epochs{{pipeline="{PIPELINE}"}}') == 2

        # The scan: this process is the driver and exposes the metrics.
        request.getfixturevalue("ray_session")
        source, out = str(tmp_path / "images"), str(tmp_path / "scan")
        good = scan_source(dataset, source)
        tel = Telemetry(TelemetryConfig(metrics_port=scan_port, pushgateway=pushgateway, pipeline=PIPELINE),
                        CollectorRegistry())
        try:
            summary = fleet.scan(model, source, out, telemetry=tel.scan())
            tiles = records_tiles(out)
            assert len(tiles) == good and summary["scanned"] == good and summary["failed"] == 1
            prom.wait('ray_inspect_scan_last_run_success{job="ray-inspect"} == 1')   # scraped after the end
            time.sleep(2)
            t1 = time.time()                        # range queries below reach past that scrape
            assert value(prom, 'ray_inspect_tiles_processed_total{job="ray-inspect"}') == sum(tiles) > 0
            assert value(prom, 'ray_inspect_images_scanned_total{job="ray-inspect"}') == good
            assert value(prom, 'sum(ray_inspect_images_failed_total{job="ray-inspect"})') == 1
            assert value(prom, 'ray_inspect_images_failed_total{job="ray-inspect", reason="corrupt"}') == 1
            pushed = f'job="ray_inspect_scan", pipeline="{PIPELINE}"'
            assert value(prom, f"ray_inspect_scan_last_run_tiles{{{pushed}}}") == sum(tiles)
            assert value(prom, 'ray_inspect_scan_images{job="ray-inspect", state="done"}') == good + 1

            empty = []
            for title, expr in dashboard_exprs():
                q = expr.replace("$__rate_interval", RATE_INTERVAL).replace("$pipeline", PIPELINE)
                if not prom.values(q, t0, t1):
                    empty.append((title, q))
            assert not empty, f"dashboard queries without data: {empty}"
        finally:
            tel.close()

        # A night that fails before its model loads is counted, by reason, and pushed.
        res = subprocess.run(
            [sys.executable, "-m", "ray_inspect.cli", "--pushgateway", pushgateway, "scan",
             str(tmp_path / "no-model"), source, str(tmp_path / "scan-2")],
            env={**env, "RAY_ADDRESS": ""}, capture_output=True, text=True, timeout=300)
        assert res.returncode == 2 and "no-model" in res.stderr, res.stderr[-2000:]
        pushed = f'job="ray_inspect_scan", pipeline="{PIPELINE}"'
        prom.wait(f'ray_inspect_scan_runs_failed_total{{{pushed}, reason="model"}} == 1')
        assert value(prom, f"ray_inspect_scan_last_run_success{{{pushed}}}") == 0
        assert value(prom, f'ray_inspect_scan_last_run_failure{{{pushed}, reason="model"}}') == 1
        assert value(prom, f'sum(ray_inspect_scan_last_run_failure{{{pushed}}})') == 1


def test_nightly_alert_without_a_pushgateway(tmp_path):
    """The chart's release-specific rule fires from kube-state-metrics' CronJob series alone (no
    Pushgateway): 26 h after the last successful night, or after creation when none succeeded; not
    while the CronJob is suspended, and not for another release's CronJob."""
    import helm_python as helm
    import yaml

    from helpers import k8s_validate as kv

    with helm.Chart.load(os.path.join(ROOT, "charts", "ray-inspect")) as chart:
        out = chart.render({}, name="qa", namespace="inspect")
    docs = [d for p, t in sorted(out.items()) if p.endswith(".yaml") for d in kv.load_documents(t)]
    groups = next(d for d in docs if d["kind"] == "PrometheusRule")["spec"]["groups"]
    nightly = [g for g in groups if g["name"] == "ray-inspect-inspect-qa-nightly"]
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": nightly}))
    ours = 'namespace="inspect", cronjob="qa-ray-inspect-nightly"'
    other = 'namespace="x", cronjob="qa-ray-inspect-nightly"'

    def case(series: dict[str, str], fires_at_30h: list[dict]) -> dict:
        return {"interval": "1h",
                "input_series": [{"series": s, "values": v} for s, v in series.items()],
                "alert_rule_test": [
                    {"eval_time": "20h", "alertname": "RayInspectNightlyNoRecentSuccess", "exp_alerts": []},
                    {"eval_time": "30h", "alertname": "RayInspectNightlyNoRecentSuccess", "exp_alerts": [
                        {"exp_labels": {"severity": "critical", **labels}, "exp_annotations": {
                            "summary": f"no successful ray-inspect night in 26 h ({labels['namespace']}/"
                                       f"{labels['cronjob']})",
                            "description": "The nightly CronJob has not completed successfully for more "
                                           "than 26 hours (or never, 26 hours after it was created); "
                                           'see docs/deploy.md, "Runbook: a failed night".'}}
                        for labels in fires_at_30h]}]}

    labels = {"namespace": "inspect", "cronjob": "qa-ray-inspect-nightly"}
    tests = {"rule_files": ["rules.yaml"], "evaluation_interval": "1h", "tests": [
        case({f"kube_cronjob_status_last_successful_time{{{ours}}}": "0x40",          # succeeded at 0 h
              f"kube_cronjob_created{{{ours}}}": "0x40",
              f"kube_cronjob_spec_suspend{{{ours}}}": "0x40"}, [labels]),
        case({f"kube_cronjob_created{{{ours}}}": "0x40",                                # never succeeded
              f"kube_cronjob_spec_suspend{{{ours}}}": "0x40"}, [labels]),
        case({f"kube_cronjob_created{{{ours}}}": "0x40",                                # suspended
              f"kube_cronjob_spec_suspend{{{ours}}}": "1x40"}, []),
        case({f"kube_cronjob_status_last_successful_time{{{ours}}}": "0x20 72000x20",   # succeeded at 20 h
              f"kube_cronjob_created{{{ours}}}": "0x40",
              f"kube_cronjob_created{{{other}}}": "0x40"}, []),                        # another release's
    ]}
    (tmp_path / "rules.test.yaml").write_text(yaml.safe_dump(tests))
    res = subprocess.run([binary("promtool"), "test", "rules", "rules.test.yaml"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
