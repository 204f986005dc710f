"""A throw-away Prometheus (and Pushgateway) for tests, like ``helpers/s3server.py`` for S3.

``prometheus_server(jobs)`` writes a temporary configuration that scrapes the given
``{job: [host:port, ...]}`` every second, starts Debian's ``/usr/bin/prometheus`` on a free
127.0.0.1 port with its TSDB in a temporary directory, waits until it is ready and stops it on exit.
``pushgateway_server()`` does the same for ``prometheus-pushgateway``. The binaries come from the
Debian packages ``prometheus`` and ``prometheus-pushgateway``, which ``make install`` sets up.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Iterator

from helpers.s3server import _log_tail, _stop, free_ports

INSTALL_HINT = "run `make install` (apt-get install prometheus prometheus-pushgateway)"


def binary(name: str) -> str:
    """Path of a Prometheus tool (``prometheus``, ``promtool``, ``prometheus-pushgateway``)."""
    found = shutil.which(name) or (f"/usr/bin/{name}" if os.access(f"/usr/bin/{name}", os.X_OK) else None)
    if not found:
        raise RuntimeError(f"{name} not found: {INSTALL_HINT}")
    return found


def _get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:   # noqa: S310 - 127.0.0.1 only
        return r.read()


def _wait_ready(proc: subprocess.Popen, url: str, timeout: float, log_path: str, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode}:\n{_log_tail(log_path)}")
        with contextlib.suppress(OSError):
            _get(url, 1.0)   # 200 once ready (503 or no connection before)
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} at {url} not ready after {timeout:.0f} s\n{_log_tail(log_path)}")
        time.sleep(0.1)


@dataclass(frozen=True)
class Prometheus:
    """A running Prometheus and its HTTP API."""

    url: str

    def api(self, path: str, **params) -> dict | list:
        q = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        body = json.loads(_get(f"{self.url}/api/v1/{path}" + (f"?{q}" if q else ""), 10.0))
        if body.get("status") != "success":
            raise RuntimeError(f"{path} {params}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        """Instant vector of ``expr`` (at time ``at``): [{"metric": {...}, "value": [t, "v"]}, ...]."""
        data = self.api("query", query=expr, time=at)
        if data["resultType"] in ("vector", "matrix"):
            return data["result"]
        return [{"metric": {}, "value": data["result"]}]

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> list[dict]:
        data = self.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=step)
        return data["result"]

    def values(self, expr: str, start: float, end: float, step: float = 1.0) -> list[float]:
        """Every finite value ``expr`` took between ``start`` and ``end`` (all series)."""
        out = []
        for series in self.query_range(expr, start, end, step):
            out += [float(v) for _, v in series["values"] if math.isfinite(float(v))]
        return out

    def wait(self, expr: str, timeout: float = 30.0) -> list[dict]:
        """Poll until ``expr`` returns a non-empty vector; returns it."""
        deadline = time.monotonic() + timeout
        while True:
            res = self.query(expr)
            if res:
                return res
            if time.monotonic() > deadline:
                raise TimeoutError(f"{expr!r} returned no data after {timeout:.0f} s; "
                                   f"targets: {self.targets()}")
            time.sleep(0.25)

    def targets(self) -> list[dict]:
        return [{k: t.get(k) for k in ("scrapeUrl", "health", "lastError")}
                for t in self.api("targets")["activeTargets"]]


def _config(jobs: dict[str, list[str]], interval: str, honor: set[str]) -> str:
    """Prometheus YAML (JSON is YAML): one static scrape job per entry."""
    return json.dumps({
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "scrape_configs": [{"job_name": job, "honor_labels": job in honor, "scrape_interval": interval,
                            "scrape_timeout": interval, "static_configs": [{"targets": targets}]}
                           for job, targets in jobs.items()],
    }, indent=2)


@contextlib.contextmanager
def prometheus_server(jobs: dict[str, list[str]], interval: str = "1s", honor_labels: tuple[str, ...] = (),
                      timeout: float = 60.0) -> Iterator[Prometheus]:
    """Run Prometheus scraping ``jobs`` (``{name: ["127.0.0.1:port", ...]}``) for the ``with`` block."""
    root = tempfile.mkdtemp(prefix="prom-")
    cfg = os.path.join(root, "prometheus.yml")
    with open(cfg, "w") as f:
        f.write(_config(jobs, interval, set(honor_labels)))
    (port,) = free_ports(1)
    log_path = os.path.join(root, "prometheus.log")
    cmd = [binary("prometheus"), f"--config.file={cfg}", f"--storage.tsdb.path={os.path.join(root, 'tsdb')}",
           f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h"]
    with _serve(cmd, root, port, log_path, timeout, "prometheus", 10.0) as url:
        yield Prometheus(url)


@contextlib.contextmanager
def _serve(cmd: list[str], root: str, port: int, log_path: str, timeout: float, name: str,
           grace: float) -> Iterator[str]:
    """Start a server (its output to ``log_path``), wait until /-/ready answers; on exit stop it
    and remove its folder ``root``."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=root,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(proc, f"{url}/-/ready", timeout, log_path, name)
        yield url
    finally:
        _stop(proc, grace)
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def pushgateway_server(timeout: float = 30.0) -> Iterator[str]:
    """Run a Pushgateway (no persistence beyond a temporary file); yields its URL."""
    root = tempfile.mkdtemp(prefix="pushgw-")
    (port,) = free_ports(1)
    log_path = os.path.join(root, "pushgateway.log")
    cmd = [binary("prometheus-pushgateway"), f"--web.listen-address=127.0.0.1:{port}",
           f"--persistence.file={os.path.join(root, 'pushgateway.data')}"]
    with _serve(cmd, root, port, log_path, timeout, "pushgateway", 5.0) as url:
        yield url


def scrape(url: str) -> str:
    """The text exposition at ``url`` (``/metrics`` of an exporter or a Pushgateway)."""
    return _get(url).decode()
