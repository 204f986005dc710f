"""Resource waiting on an autoscaling cluster: GPU nodes that the autoscaler adds from zero.

The cluster is Ray's fake multi-node autoscaler, configured as ``ray.cluster_utils.AutoscalingCluster``
configures it (whose template file the wheel does not ship): a head without GPUs and a node type with
one GPU, min 0, max 2. It is started here on 127.0.0.1 with token auth, and without ``ray stop``, which
would stop the test session's own Ray too. Its fake GPU nodes compute on CPU (``RAY_INSPECT_DEVICE=cpu``).
``scan`` and ``train`` run as the real command.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from helpers.s3server import free_ports

BIN = os.path.dirname(sys.executable)
GPU_NODES = {"gpu": {"resources": {"CPU": 1, "GPU": 1}, "node_config": {}, "min_workers": 0,
                     "max_workers": 2}}


def _autoscaling_config(head_cpus: int, gcs_address: str) -> dict:
    """The fake multi-node provider's cluster config: the head node type and GPU_NODES, whose nodes
    join the head's GCS at ``gcs_address``."""
    return {
        "cluster_name": "fake_multinode", "max_workers": 2,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "available_node_types": {"ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {},
                                                      "max_workers": 0}, **GPU_NODES},
        "head_node_type": "ray.head.default", "upscaling_speed": 1.0, "idle_timeout_minutes": 1.0,
        "auth": {}, "docker": {}, "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [], "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": []}


def _ray_env(token: str) -> dict:
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_INSPECT_DEVICE": "cpu",
           "PATH": BIN + os.pathsep + os.environ.get("PATH", "")}
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture(scope="module")
def autoscaling_cluster():
    """(GCS address, environment): a head with 1 CPU and no GPU, GPU nodes added on demand."""
    ports = free_ports(6)
    address = f"127.0.0.1:{ports[0]}"
    config = _autoscaling_config(head_cpus=1, gcs_address=address)
    temp = tempfile.mkdtemp(prefix="as-", dir="/tmp")         # Ray's socket paths must stay short
    config_path = os.path.join(temp, "autoscaling.json")
    with open(config_path, "w") as f:
        json.dump(config, f)
    env = {**_ray_env(secrets.token_hex(32)), "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_FAKE_CLUSTER": "1"}
    cmd = [os.path.join(BIN, "ray"), "start", "--head", "--block", f"--autoscaling-config={config_path}",
           "--node-ip-address=127.0.0.1", f"--port={ports[0]}", "--num-cpus=1", "--include-dashboard=false",
           f"--ray-client-server-port={ports[1]}", f"--dashboard-agent-listen-port={ports[2]}",
           f"--metrics-export-port={ports[3]}", f"--runtime-env-agent-port={ports[4]}",
           f"--node-manager-port={ports[5]}", f"--temp-dir={temp}", "--disable-usage-stats"]
    head = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        _wait_for_head(address, env, head)
        yield address, env
    finally:
        _stop_group(head)
        shutil.rmtree(temp, ignore_errors=True)


def _resources(address: str, env: dict) -> dict:
    """The cluster's resources now, as a driver of its own sees them."""
    probe = ("import json, ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
             "print(json.dumps(ray.cluster_resources()))")
    res = subprocess.run([sys.executable, "-c", probe, address], env=env, capture_output=True, text=True,
                         timeout=120, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def _wait_for_head(address: str, env: dict, head: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    probe = "import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR')"
    while time.monotonic() < deadline:
        assert head.poll() is None, "ray start --head exited"
        res = subprocess.run([sys.executable, "-c", probe, address], env=env, capture_output=True, text=True,
                             timeout=60)
        if res.returncode == 0:
            return
        time.sleep(1)
    raise RuntimeError(f"the autoscaling head at {address} did not come up in {timeout:.0f} s")


def _stop_group(head: subprocess.Popen) -> None:
    """The head and everything it started (the autoscaler's fake nodes included): ^C, then SIGKILL."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        head.wait(30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGKILL)


def _cli(env: dict, *args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([os.path.join(BIN, "ray-inspect"), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_scan_and_train_wait_for_gpu_nodes_the_autoscaler_adds(autoscaling_cluster, trained_model, patches,
                                                               dataset, tmp_path):
    address, env = autoscaling_cluster
    assert "GPU" not in _resources(address, env)                 # no GPU node is up yet
    source = tmp_path / "night"
    source.mkdir()
    for i, f in enumerate(sorted(Path(dataset, "test").rglob("*.png"))[:4]):
        shutil.copy(f, source / f"{i}.png")
    scan = subprocess.Popen(
        [os.path.join(BIN, "ray-inspect"), "scan", trained_model, str(source), str(tmp_path / "out"),
         "--gpus-per-worker", "1", "--workers", "2", "--address", address, "--json"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = scan.communicate(timeout=400)
    assert scan.returncode == 0, err[-3000:]
    summary = json.loads(out)
    assert (summary["workers"], summary["gpus_per_worker"], summary["scanned"]) == (2, 1.0, 4)
    train = _cli(env, "train", patches, str(tmp_path / "model"), "--use-gpu", "--workers", "2",
                 "--epochs", "1", "--storage", str(tmp_path / "runs"), "--address", address, "--json")
    assert train.returncode == 0, train.stderr[-3000:]
    card = json.loads(train.stdout)["card"]
    assert card["training"]["use_gpu"] is True and card["training"]["workers"] == 2


@pytest.mark.slow
def test_without_a_node_type_that_has_gpus_both_give_up_in_one_line(ray_session, trained_model, patches,
                                                                    dataset, tmp_path):
    """The test session's own Ray has no GPUs and no autoscaler: after --wait-for-resources 8 the scan
    and the training exit 2 with one line saying what they asked for and what the cluster offers."""
    import ray

    env = {**os.environ, "PATH": BIN + os.pathsep + os.environ.get("PATH", "")}
    address = ray.get_runtime_context().gcs_address
    source = tmp_path / "night"
    source.mkdir()
    shutil.copy(next(Path(dataset, "test").rglob("*.png")), source / "a.png")
    common = ["--wait-for-resources", "8", "--address", address]
    runs = {
        "scan": subprocess.Popen([os.path.join(BIN, "ray-inspect"), "scan", trained_model, str(source),
                                  str(tmp_path / "out"), "--gpus-per-worker", "1", *common],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
        "train": subprocess.Popen([os.path.join(BIN, "ray-inspect"), "train", patches, str(tmp_path / "m"),
                                   "--use-gpu", "--epochs", "1", "--storage", str(tmp_path / "runs"),
                                   *common],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)}
    t0 = time.monotonic()
    for name, proc in runs.items():
        _, err = proc.communicate(timeout=300)
        lines = [ln for ln in err.splitlines() if ln.startswith("ray-inspect: error:")]
        assert proc.returncode == 2, (name, err[-3000:])
        assert len(lines) == 1 and "Traceback" not in err, (name, err[-3000:])
        assert "GPU: 1" in lines[0] and "after 8 s" in lines[0] and "the cluster offers {CPU: 2}" in lines[0]
    assert 8 <= time.monotonic() - t0 < 200
    assert not (tmp_path / "out" / "_SUCCESS").exists() and not (tmp_path / "m").exists()
