"""Joining or starting Ray (distributed/cluster.py) next to a Ray that someone else started."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from helpers.s3server import free_ports

pytestmark = pytest.mark.slow

CONNECT = ("import json; from ray_inspect.distributed.cluster import ensure_ray; "
           "print(json.dumps(ensure_ray(num_cpus=2)))")


def test_without_an_address_a_running_local_ray_is_not_joined():
    """A `ray start --head` on the same machine (another project's, or a test's cluster) registers
    itself as the machine's current Ray; without --address ray-inspect must still start its own."""
    tmp = tempfile.mkdtemp(prefix="ri-", dir="/tmp")          # short: Ray's socket paths live under it
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": tmp}
    ray = str(Path(sys.executable).with_name("ray"))
    with open(os.path.join(tmp, "head.log"), "w") as log:
        head = subprocess.Popen([ray, "start", "--head", "--block", "--num-cpus", "1",
                                 "--port", str(free_ports(1)[0]), "--include-dashboard", "false",
                                 "--disable-usage-stats"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        current = Path(tmp, "ray", "ray_current_cluster")
        deadline = time.monotonic() + 60
        while not current.exists() and head.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert current.exists(), Path(tmp, "head.log").read_text()
        run = subprocess.run([sys.executable, "-c", CONNECT], env=env, capture_output=True, text=True,
                             timeout=120)
        assert run.returncode == 0, run.stderr[-2000:]
        assert json.loads(run.stdout.splitlines()[-1])["CPU"] == 2     # its own Ray, not the head's 1 CPU
    finally:
        head.terminate()
        head.wait(timeout=60)
        shutil.rmtree(tmp, ignore_errors=True)
