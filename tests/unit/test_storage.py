"""Atomic, idempotent writes and listing on local paths; the retry policy against a real S3 client."""

import http.server
import os
import posixpath
import threading

import pytest

from ray_inspect.io import storage


def test_atomic_write_and_read(tmp_path):
    url = str(tmp_path / "a" / "b" / "obj.bin")
    storage.write_bytes(url, b"one")
    storage.write_bytes(url, b"two")  # idempotent overwrite
    assert storage.read_bytes(url) == b"two"
    assert not [f for f in os.listdir(tmp_path / "a" / "b") if f.startswith(".tmp-")]
    assert storage.read_bytes("file://" + url) == b"two"
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(url).st_mode & 0o777 == 0o666 & ~umask   # not mkstemp's 0600


def test_find_relative_and_errors(tmp_path):
    for rel in ("x/1.png", "x/y/2.png", "3.txt"):
        storage.write_bytes(str(tmp_path / rel), b".")
    found = storage.find(str(tmp_path))
    assert [storage.relative(u, str(tmp_path)) for u in found] == ["3.txt", "x/1.png", "x/y/2.png"]
    with pytest.raises(storage.StorageError, match="no such file"):
        storage.read_bytes(str(tmp_path / "nope"))
    with pytest.raises(storage.StorageError, match="no such directory"):
        storage.find(str(tmp_path / "nope"))
    assert storage.join("s3://b/p/", "q", "r.png") == "s3://b/p/q/r.png"


def test_names_that_start_with_two_dots_are_below_the_root_and_listed(tmp_path):
    """``..hidden.png`` and ``..dir/`` are ordinary names; only a ``..`` segment leaves the root."""
    from PIL import Image

    from ray_inspect.io.datasets import list_samples

    for rel in ("..hidden.png", "..dir/b.png", "a.png"):
        (tmp_path / "src" / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (8, 8)).save(tmp_path / "src" / rel)
    root = str(tmp_path / "src")
    assert sorted(s.key for s in list_samples(root)) == ["..dir/b.png", "..hidden.png", "a.png"]
    assert storage.relative("s3://b/src/..x/y.png", "s3://b/src") == "..x/y.png"
    for outside in (str(tmp_path / "a.png"), "s3://b/other/y.png", "s3://b/srcx/y.png"):
        with pytest.raises(ValueError, match="is not below"):
            storage.relative(outside, root if outside.startswith("/") else "s3://b/src")


def test_endpoint_from_environment(monkeypatch):
    monkeypatch.setenv(storage.ENDPOINT_ENV, "http://127.0.0.1:9")
    assert storage.storage_options("s3://b/k")["endpoint_url"] == "http://127.0.0.1:9"
    assert storage.storage_options("/tmp/x") == {}


def test_botocores_endpoint_variables_alone_reach_s3fs_and_pyarrow(monkeypatch):
    """AWS_ENDPOINT_URL (or _S3) without the project's variable: s3fs and Ray Train's pyarrow
    filesystem both get it (pyarrow reads no endpoint variable of its own); the project's wins."""
    from ray_inspect.distributed.train import _storage_fs

    for var in storage.ENDPOINT_ENVS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:19")
    assert storage.storage_options("s3://b/k")["endpoint_url"] == "http://127.0.0.1:19"
    path, fs = _storage_fs("s3://b/runs")
    assert path == "b/runs" and fs.__reduce__()[1][0]["endpoint_override"] == "http://127.0.0.1:19"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:29")
    assert storage.s3_endpoint() == "http://127.0.0.1:29"
    monkeypatch.setenv(storage.ENDPOINT_ENV, "http://127.0.0.1:39")
    assert storage.s3_endpoint() == "http://127.0.0.1:39"


def test_contains_compares_whole_segments_and_resolves_links(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "l").symlink_to(tmp_path / "a")
    assert storage.contains(str(tmp_path / "a"), str(tmp_path / "a" / "b" / "c.zarr"))
    assert storage.contains(str(tmp_path / "a"), str(tmp_path / "a") + "/")
    assert storage.contains(str(tmp_path / "l"), str(tmp_path / "a" / "b"))          # through the link
    assert storage.contains(str(tmp_path / "a" / "b"), str(tmp_path / "a" / "b" / ".." / "b" / "x"))
    assert not storage.contains(str(tmp_path / "a"), str(tmp_path / "ab"))
    assert not storage.contains(str(tmp_path / "a" / "b"), str(tmp_path / "a"))
    assert storage.contains("s3://bkt/archive", "s3://bkt/archive/line3/x.png")
    assert storage.contains("s3://bkt/archive/", "s3://bkt/archive")
    assert not storage.contains("s3://bkt/archive", "s3://bkt/archive-scans/x")
    assert not storage.contains("s3://bkt/archive", "gs://bkt/archive/x")
    assert not storage.contains("s3://bkt/a", str(tmp_path / "a"))


HOSTILE_KEYS = ["ok.png", "/abs/x.png", "//abs/x.png", "a//b.png", "x/../../../../etc/y.png", "..", ".", "",
                "./a.png", "a/./b.png", "a/..", "..hidden.png", "..dir/w.png", "back\\slash.png",
                "tab\there.png",
                "new\nline.png", "bad\udcffname.png", "%2E%2E", "%2F.png", "a/", "a%2F", "sp ace/ünï.png",
                "L" * 300 + ".png", "L" * 300 + ".tiff", "d/" + "x" * 1500]


def test_safe_path_stays_below_any_root_and_keeps_keys_distinct(tmp_path):
    """Judged by the OS's own path resolution and by POSIX normalisation (an S3 OUT), not by the
    mapping's rules: every key lands below the root, in segments a file system takes, one-to-one."""
    root = str(tmp_path / "out")
    paths = [storage.safe_path(k) for k in HOSTILE_KEYS]
    assert len(set(paths)) == len(HOSTILE_KEYS)
    for key, p in zip(HOSTILE_KEYS, paths, strict=True):
        local = os.path.realpath(storage.join(root, "records", p + ".json"))
        assert local.startswith(os.path.realpath(root) + os.sep), (key, p)
        s3 = storage.join("s3://b/out", "records", p + ".json")
        assert posixpath.normpath(s3.split("://", 1)[1]).startswith("b/out/records/"), (key, p)
        assert all(seg not in ("", ".", "..") for seg in p.split("/")), (key, p)
        assert all(len(seg.encode()) + len(".tiff") <= 255 for seg in p.split("/")), (key, p)
        assert len(p.encode()) <= storage.PATH_BYTES and p.encode().decode() == p
        os.makedirs(os.path.dirname(local), exist_ok=True)
        with open(local, "w") as f:              # the file system takes every name
            f.write(key.encode("utf-8", "surrogateescape").decode("latin-1"))
    long = "a" * 300                     # a key that looks like another one capped is not it
    assert storage.safe_path(long) != storage.safe_path(storage.safe_path(long))
    assert storage.safe_path("a" + "/" * 400) != storage.safe_path("a" + "/" * 401)
    assert max(len(seg.encode()) for seg in storage.safe_path("a" + "/" * 400).split("/")) <= 255 - 5
    assert storage.safe_path("\ud800") != storage.safe_path("\udced\udca0\udc80")
    assert storage.safe_path("plain/dir/name.png") == "plain/dir/name.png"
    assert storage.safe_path("sp ace/ünï.png") == "sp ace/ünï.png"


def test_output_stems_of_hostile_keys_are_distinct_and_safe():
    from ray_inspect.steps.imagescan import output_stems

    folders = output_stems(["a.png", "a.png/x.png", "r.png", "r.json/y.png"])   # a file where a folder goes
    assert folders == {"a.png": "a.png", "a.png/x.png": "a.png/x", "r.png": "r.png",
                       "r.json/y.png": "r.json/y"}
    keys = ["a.png", "a.png.tiff", "a.tiff", "x/../a.png", "/a.png", "%2Fa.png"]
    stems = output_stems(keys)
    assert len(set(stems.values())) == len(keys)
    assert [stems[k] for k in keys] == ["a.png", "a.png.tiff", "a.tiff", "x/%2E%2E/a", "%2Fa", "%252Fa"]


class _S3Stub(http.server.ThreadingHTTPServer):
    """An S3 endpoint on 127.0.0.1 that counts the requests it gets and answers every one alike:
    503 SlowDown (throttling), or 404 NoSuchKey for paths that contain "missing". (s3fs reads an
    object with one request here: a HEAD, which fails.)"""

    def __init__(self):
        self.requests = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(handler):  # noqa: N805 - the server is self
                self.requests += 1
                status, code = (404, "NoSuchKey") if "missing" in handler.path else (503, "SlowDown")
                body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                        f"<Message>{code}</Message></Error>").encode()
                handler.send_response(status)
                handler.send_header("Content-Type", "application/xml")
                handler.send_header("Content-Length", str(len(body)))
                handler.end_headers()
                if handler.command != "HEAD":
                    handler.wfile.write(body)

            do_HEAD = do_PUT = do_POST = do_GET

            def log_message(handler, *args):  # noqa: N805
                pass

        super().__init__(("127.0.0.1", 0), Handler)


@pytest.fixture
def fast_retries(monkeypatch):
    """Three tries, hardly any waiting, dummy credentials; s3fs's cached clients forgotten."""
    import s3fs

    from ray_inspect.config import RetryPolicy

    policy = RetryPolicy(attempts=3, first_wait=0.01, max_wait=0.02, jitter=0.0, connect_timeout=2)
    monkeypatch.setattr(storage, "RETRY", policy)
    for var in (*storage.ENDPOINT_ENVS, "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_MAX_ATTEMPTS",
                "AWS_RETRY_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    s3fs.S3FileSystem.clear_instance_cache()
    yield policy
    s3fs.S3FileSystem.clear_instance_cache()


def test_a_throttled_request_is_sent_as_often_as_the_policy_says(fast_retries, monkeypatch):
    """One retry layer: s3fs and botocore send each try once, so the endpoint sees exactly the
    policy's attempts, each retry is counted, and the error says the store kept failing."""
    stub = _S3Stub()
    threading.Thread(target=stub.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv(storage.ENDPOINT_ENV, f"http://127.0.0.1:{stub.server_address[1]}")
        before, thread_before = storage.retries(), storage.thread_retries()
        with pytest.raises(storage.StorageError, match=r"^s3://b/busy.png: cannot read") as busy:
            storage.read_bytes("s3://b/busy.png")
        assert stub.requests == fast_retries.attempts == 3 and busy.value.transient
        assert storage.retries() - before == storage.thread_retries() - thread_before == 2
        before = storage.retries()
        with pytest.raises(storage.StorageError, match="no such file") as missing:
            storage.read_bytes("s3://b/missing.png")
        assert storage.retries() == before and not missing.value.transient
    finally:
        stub.shutdown()
        stub.server_close()


def test_an_unreachable_store_is_retried_and_is_not_a_bad_input(fast_retries, monkeypatch):
    """Connection refused (botocore's EndpointConnectionError, not an OSError) is transient; an
    image that cannot be fetched for that reason is a storage failure, not an unreadable input."""
    from helpers.s3server import free_ports
    from ray_inspect.io.images import fetch

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_ports(1)[0]}")
    before = storage.retries()
    with pytest.raises(storage.StorageError, match="cannot read") as refused:
        fetch("s3://b/a.png")
    assert refused.value.transient and type(refused.value) is storage.StorageError
    assert storage.retries() - before == fast_retries.attempts - 1


def test_the_policy_waits_long_enough_to_ride_out_a_short_outage():
    from ray_inspect.config import RetryPolicy

    assert RetryPolicy().budget() == 0.5 + 1 + 2 + 4 + 8 + 10 * 4
    assert RetryPolicy(attempts=1).budget() == 0


def test_streamed_listing_is_in_key_order_and_resumes_after_a_key(tmp_path):
    """iter_versions: whole relative paths in code-point order (``a.png`` before ``a/x.png``, as S3
    lists them), the versions find() would give, and a listing that resumes after a key."""
    keys = ["a.png", "a/x.png", "a-b.png", "b/c/d.png", "a.png.tiff", "Z.png", "é.png", "a/x.png.d/y.png"]
    for k in keys:
        storage.write_bytes(str(tmp_path / k), k.encode())
    listed = [(storage.relative(u, str(tmp_path)), v) for u, v in storage.iter_versions(str(tmp_path))]
    names = [k for k, _ in listed]
    assert names == sorted(names) and set(names) == set(keys)
    for name, version in listed:
        st = os.stat(tmp_path / name)
        assert version == f"{st.st_size}-{st.st_mtime}" == storage.version(str(tmp_path / name))
    after = [storage.relative(u, str(tmp_path)) for u, _ in storage.iter_versions(str(tmp_path), "a.png")]
    assert after == [n for n in names if n > "a.png"]
    with pytest.raises(storage.StorageError, match="no such directory"):
        list(storage.iter_versions(str(tmp_path / "nope")))


def test_keys_kept_as_they_are_are_exactly_those_escaping_leaves_alone():
    """safe_path's fast path (most keys need no escaping) gives what the escaping gives, for random
    keys of the characters and segments that matter."""
    import random

    rng = random.Random(0)
    alphabet = ["a", "/", ".", "%", "\\", "\x01", "é", "\udcff", " ", "..", "x" * 60, "ü" * 30]
    plain = 0
    for _ in range(50_000):
        key = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12)))
        assert storage.safe_path(key) == storage._escaped_path(key), repr(key)
        plain += storage._plain(key)
    assert 1000 < plain < 50_000                  # both paths were taken
