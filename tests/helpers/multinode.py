"""Several Ray nodes on one machine (``ray.cluster_utils.Cluster``), every node on 127.0.0.1 with token
auth, in a process of its own: the test session's Ray lives in the pytest process, which cannot host a
second one. The test drives it over stdin (kill a worker node's raylet, add a node) and runs the real
``ray-inspect`` command against its address.

Ray turns a 127.0.0.1 address into the machine's address before connecting unless
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (its loopback mode), which both sides of this cluster set.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile

LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
BIN = os.path.dirname(sys.executable)


class MultiNode:
    """A head and ``workers`` worker nodes of ``cpus`` CPUs each; ``env`` reaches it (token included)."""

    def __init__(self, workers: int, cpus: int = 1):
        self.temp = tempfile.mkdtemp(prefix="mn-", dir="/tmp")   # Ray's socket paths must stay short
        token = secrets.token_hex(32)
        self.env = {**os.environ, **LOOPBACK, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
                    "PATH": BIN + os.pathsep + os.environ.get("PATH", "")}
        self.env.pop("RAY_ADDRESS", None)
        self.proc = subprocess.Popen([sys.executable, __file__, str(workers), str(cpus), self.temp],
                                     env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, start_new_session=True)
        started = self._answer()
        self.address, self.workers = started["address"], started["workers"]

    def kill_worker(self) -> str:
        """Kill the last worker node's raylet (and the workers on it) at once, as a lost machine would."""
        return self._ask("kill")["killed"]

    def add_worker(self) -> str:
        return self._ask("add")["added"]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
        shutil.rmtree(self.temp, ignore_errors=True)

    def _ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def _answer(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the multi-node cluster process ended (exit {self.proc.wait()})")
        return json.loads(line)


def _serve(workers: int, cpus: int, temp: str) -> None:
    """Start the cluster, report its address, then obey one command a line until stdin closes."""
    from ray.cluster_utils import Cluster

    args = {"num_cpus": cpus, "node_ip_address": "127.0.0.1", "include_dashboard": False, "temp_dir": temp}
    cluster = Cluster(initialize_head=True, head_node_args=args)
    nodes = [cluster.add_node(**args) for _ in range(workers)]
    cluster.wait_for_nodes()
    _say(address=cluster.address, workers=[n.node_id for n in nodes])
    for line in sys.stdin:
        if line.strip() == "kill":
            node = nodes.pop()
            cluster.remove_node(node, allow_graceful=False)
            _say(killed=node.node_id)
        elif line.strip() == "add":
            nodes.append(cluster.add_node(**args))
            cluster.wait_for_nodes()
            _say(added=nodes[-1].node_id)
    cluster.shutdown()


def _say(**fields) -> None:
    print(json.dumps(fields), flush=True)


if __name__ == "__main__":
    os.environ.update(LOOPBACK)
    _serve(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
