"""moto's S3 server on 127.0.0.1, for keys exactly as AWS stores them (``..`` and empty segments:
SeaweedFS normalises those). Used for that purpose only; the S3 fixture of the suite is SeaweedFS."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Iterator

from helpers.s3server import _client, _log_tail, _stop, free_ports

KEY, SECRET = "moto-test-key", "moto-test-secret"     # moto accepts any; never real ones


def _binary() -> str:
    here = os.path.join(os.path.dirname(sys.executable), "moto_server")
    found = here if os.access(here, os.X_OK) else shutil.which("moto_server")
    if not found:
        raise RuntimeError("moto_server not found: pip install 'moto[server]'")
    return found


@contextlib.contextmanager
def moto_server(bucket: str, timeout: float = 30.0) -> Iterator[str]:
    """Run moto's S3 server with ``bucket`` created; yields its endpoint URL."""
    port = free_ports(1)[0]
    endpoint = f"http://127.0.0.1:{port}"
    root = tempfile.mkdtemp(prefix="moto-")
    log_path = os.path.join(root, "moto.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([_binary(), "-H", "127.0.0.1", "-p", str(port)], stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        client = _client(endpoint, KEY, SECRET)
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.create_bucket(Bucket=bucket)
                break
            except Exception as exc:  # noqa: BLE001 - not up yet
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server not ready: {exc}\n{_log_tail(log_path)}") from None
                time.sleep(0.2)
        client.close()
        yield endpoint
    finally:
        _stop(proc, 3.0)
        shutil.rmtree(root, ignore_errors=True)
