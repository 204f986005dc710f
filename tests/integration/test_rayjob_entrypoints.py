"""The chart's RayJob entrypoints run as real Ray Jobs, not as strings.

A Ray head with its Jobs API (token auth on, every port on 127.0.0.1) takes each rendered entrypoint
the way KubeRay's submitter hands it over: joined after ``ray job submit ... --`` into one ``bash -c``
line. The job's final status is what Kubernetes would see.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import helm_python as helm
import pytest

from helpers import k8s_validate as kv
from helpers.s3server import free_ports

CHART = Path(__file__).resolve().parents[2] / "charts" / "ray-inspect"
BIN = os.path.dirname(sys.executable)


@pytest.fixture(scope="module")
def jobs_api():
    """A Ray head with the Jobs API on 127.0.0.1: (address, environment to reach it with)."""
    ports = free_ports(9)
    token = secrets.token_hex(32)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "PATH": BIN + os.pathsep + os.environ.get("PATH", "")}
    env.pop("RAY_ADDRESS", None)
    temp = tempfile.mkdtemp(prefix="rj-", dir="/tmp")        # Ray's socket paths must stay short
    cmd = [os.path.join(BIN, "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           f"--port={ports[0]}", "--dashboard-host=127.0.0.1", f"--dashboard-port={ports[1]}",
           f"--ray-client-server-port={ports[2]}", f"--dashboard-agent-listen-port={ports[3]}",
           f"--dashboard-agent-grpc-port={ports[4]}", f"--metrics-export-port={ports[5]}",
           f"--runtime-env-agent-port={ports[6]}", f"--node-manager-port={ports[7]}",
           f"--object-manager-port={ports[8]}", "--num-cpus=4", "--include-dashboard=true",
           f"--temp-dir={temp}", "--disable-usage-stats"]
    head = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    address = f"http://127.0.0.1:{ports[1]}"
    try:
        _wait_for_jobs_api(address, env, head)
        yield address, env
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGINT)      # --block: on ^C the head takes its processes down
        try:
            head.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def _wait_for_jobs_api(address: str, env: dict, head: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert head.poll() is None, "ray start --head exited"
        probe = subprocess.run([os.path.join(BIN, "ray"), "job", "list", "--address", address], env=env,
                               capture_output=True, text=True, timeout=60)
        if probe.returncode == 0:
            return
        time.sleep(1)
    raise RuntimeError(f"the Jobs API at {address} did not answer in {timeout:.0f} s")


def _entrypoints(values: dict) -> tuple[str, str]:
    """(train, scan) entrypoints of the chart rendered with ``values``."""
    with helm.Chart.load(CHART) as chart:
        out = chart.render(values, name="ri", namespace="inspect")
    docs = [d for path, text in sorted(out.items()) if path.endswith(".yaml")
            for d in kv.load_documents(text)]
    train = next(d for d in docs if d["kind"] == "RayJob")["spec"]["entrypoint"]
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and "rayjob.yaml" in d.get("data", {}))
    return train, kv.embedded_rayjobs(cm)[0]["spec"]["entrypoint"]


def _local_metrics(entrypoint: str) -> str:
    """The entrypoint with its metrics served on 127.0.0.1 instead of the pod's 0.0.0.0 (tests bind
    nothing beyond this machine); nothing else changes."""
    assert entrypoint.count(" --metrics-bind 0.0.0.0 ") == 1, entrypoint
    return entrypoint.replace(" --metrics-bind 0.0.0.0 ", " --metrics-bind 127.0.0.1 ")


def _submit(address: str, env: dict, entrypoint: str) -> str:
    """Submit as KubeRay's submitter does: the entrypoint joined into its own shell command line."""
    job_id = "ri-" + secrets.token_hex(4)
    line = f"ray job submit --address {address} --submission-id {job_id} --no-wait -- {entrypoint}"
    res = subprocess.run(["bash", "-c", line], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return job_id


_WAIT = """
import sys, time
from ray.job_submission import JobSubmissionClient
client, job, deadline = JobSubmissionClient(sys.argv[1]), sys.argv[2], time.monotonic() + float(sys.argv[3])
while str(status := client.get_job_status(job).value) not in ("SUCCEEDED", "FAILED", "STOPPED"):
    if time.monotonic() > deadline:
        break
    time.sleep(1)
print(client.get_job_logs(job)[-3000:])
print(status)
"""


def _final_status(address: str, env: dict, job_id: str, timeout: float = 400) -> tuple[str, str]:
    """(status, the end of the job's log) once the job has ended (in a process of its own: this one
    holds the test session's Ray token)."""
    res = subprocess.run([sys.executable, "-c", _WAIT, address, job_id, str(timeout)], env=env,
                         capture_output=True, text=True, timeout=timeout + 60)
    assert res.returncode == 0, res.stderr[-2000:]
    logs, _, status = res.stdout.rstrip().rpartition("\n")
    return status, logs


@pytest.mark.slow
def test_rendered_entrypoints_end_as_kubernetes_should_see_them(jobs_api, calibrated, patches, dataset,
                                                                 tmp_path):
    """Training finishes SUCCEEDED and writes its model; a night with a corrupt file ends SUCCEEDED
    under allowBadInputs (the file still in errors.jsonl) and FAILED without it."""
    address, env = jobs_api
    source = tmp_path / "night"
    source.mkdir()
    for i, f in enumerate(sorted(Path(dataset, "test").rglob("*.png"))[:3]):
        shutil.copy(f, source / f"{i}.png")
    (source / "zz-corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    ports = iter(free_ports(3))

    def entrypoints(out: str, allow: bool) -> tuple[str, str]:
        """(train, scan), each serving its metrics on a port of its own."""
        return _entrypoints({
            "workers": {"gpu": {"enabled": False}, "cpu": {"enabled": True}},
            "telemetry": {"metricsPort": next(ports), "logFormat": "json"},
            "training": {"patches": patches, "model": str(tmp_path / "model"),
                         "storage": str(tmp_path / "runs"), "epochs": 1, "workers": 1, "batchSize": 32},
            "scan": {"model": calibrated[0], "source": str(source), "out": str(tmp_path / out), "workers": 1,
                     "allowBadInputs": allow, "extraArgs": ["--cpus-per-worker", "1"]}})

    train, _ = entrypoints("unused", True)
    _, allowed = entrypoints("allowed", True)
    _, strict = entrypoints("strict", False)
    jobs = {name: _submit(address, env, _local_metrics(e))
            for name, e in (("train", train), ("allowed", allowed), ("strict", strict))}
    status = {name: _final_status(address, env, job) for name, job in jobs.items()}
    assert status["train"][0] == "SUCCEEDED", status["train"][1][-3000:]
    assert (tmp_path / "model" / "card.json").exists()
    assert status["allowed"][0] == "SUCCEEDED", status["allowed"][1][-3000:]
    assert status["strict"][0] == "FAILED", status["strict"][1][-3000:]
    for out in ("allowed", "strict"):
        errors = (tmp_path / out / "errors.jsonl").read_text().splitlines()
        assert len(errors) == 1 and "zz-corrupt.png" in errors[0]
        assert (tmp_path / out / "_SUCCESS").exists()
