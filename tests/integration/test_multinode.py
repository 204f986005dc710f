"""The scan and training on a multi-node Ray cluster (``ray.cluster_utils.Cluster``: a head and two
worker nodes of one CPU each, on 127.0.0.1) that loses a worker node mid-run: its raylet and the
workers on it are killed, as when a machine goes away. ``scan`` and ``train`` run as the real command,
a driver outside the cluster joining it with ``--address``."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.multinode import MultiNode
from helpers.scans import assert_outputs_equal, output_stem_list
from ray_inspect.distributed.scan import manifest_entries

pytestmark = pytest.mark.slow
RAY_INSPECT = str(Path(sys.executable).parent / "ray-inspect")


@pytest.fixture(scope="module")
def cluster():
    nodes = MultiNode(workers=2)
    yield nodes
    nodes.close()


def _start(cluster: MultiNode, log: Path, *args: str) -> subprocess.Popen:
    """The command joining the cluster, its terminal lines going to ``log`` as they come."""
    with open(log, "w") as err:
        return subprocess.Popen([RAY_INSPECT, *args, "--address", cluster.address], env=cluster.env,
                                stdout=subprocess.PIPE, stderr=err, text=True)


def _wait_for(proc: subprocess.Popen, log: Path, ready, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)


def _end(proc: subprocess.Popen, log: Path, timeout: float = 400) -> tuple[str, str]:
    """(stdout, the terminal lines) once the command has ended."""
    stdout, _ = proc.communicate(timeout=timeout)
    return stdout, log.read_text()


def test_a_worker_node_lost_mid_scan_leaves_every_image_once_and_the_outputs_unchanged(
        cluster, calibrated, archive, clean, tmp_path):
    """Three actors, one a node; the last worker node dies after a few images. The scan ends with 40
    images, each counted once, and the bytes of an uninterrupted scan whose actors have one thread each."""
    out, log = tmp_path / "out", tmp_path / "scan.log"
    proc = _start(cluster, log, "scan", calibrated[0], archive, str(out), "--workers", "3",
                  "--cpus-per-worker", "1", "--json")
    _wait_for(proc, log, lambda: len(list((out / "records").glob("**/*.json"))) >= 4)
    cluster.kill_worker()
    stdout, stderr = _end(proc, log)
    cluster.add_worker()                            # the next test starts with three nodes again
    assert proc.returncode == 0, stderr[-3000:]
    summary = json.loads(stdout)
    assert (summary["workers"], summary["scanned"], summary["failed"]) == (3, 40, 0)
    assert summary["retried"] >= 1                  # the lost node's actor held images
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 40 and metrics == json.loads(Path(clean[2], "metrics.json").read_text())
    assert_outputs_equal(str(out), clean[2], output_stem_list(archive))
    entries = list(manifest_entries(str(out)))
    assert len(entries) == 40 and len({e["key"] for e in entries}) == 40
    assert {e["status"] for e in entries} == {"ok"}
    assert "Traceback" not in stderr


def test_a_worker_node_lost_mid_training_resumes_from_the_last_checkpoint(cluster, patches, tmp_path):
    """Two training workers on two nodes (the head and one worker node, one CPU each, so one worker on
    each); after the second epoch the worker node dies and another joins. Ray Train restarts the
    worker group from the last checkpoint (epoch 1 or 2): no epoch before it runs again, every epoch
    after it runs in the new group. The driver's progress queue, on the head, outlives the node."""
    cluster.kill_worker()                           # two nodes are left: the training needs both
    runs, log = tmp_path / "runs", tmp_path / "train.log"
    proc = _start(cluster, log, "train", patches, str(tmp_path / "m"), "--epochs", "3", "--batch-size", "32",
                  "--workers", "2", "--cpus-per-worker", "1", "--checkpoint-every", "1",
                  "--max-failures", "2", "--storage", str(runs), "--run-name", "mn", "--json")
    # epoch 2 has ended, so epoch 1's checkpoint is registered (a checkpoint folder can exist before)
    _wait_for(proc, log, lambda: re.search(r"epoch +2/3  loss", log.read_text()))
    cluster.kill_worker()
    cluster.add_worker()
    stdout, stderr = _end(proc, log)
    assert proc.returncode == 0, stderr[-3000:]
    resumed = [int(m) for m in re.findall(r"resumed from epoch (\d+) ", stderr)]
    assert len(resumed) == 1 and resumed[0] >= 1, stderr[-3000:]
    before, _, after = stderr.partition("resumed from epoch")
    epochs_before = [int(m) for m in re.findall(r"epoch +(\d+)/3  loss", before)]
    epochs_after = [int(m) for m in re.findall(r"epoch +(\d+)/3  loss", after)]
    assert epochs_before[:resumed[0]] == list(range(1, resumed[0] + 1))    # ran once, before the loss
    assert epochs_after == list(range(resumed[0] + 1, 4))                  # all the rest, in the new group
    card = json.loads(stdout)["card"]
    assert card["training"]["workers"] == 2 and card["training"]["epochs_run"] == 3
    assert (tmp_path / "m" / "card.json").exists() and "Traceback" not in stderr
