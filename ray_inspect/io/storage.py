"""Object storage through fsspec: local paths, file://, s3:// (any S3-compatible endpoint).

Writes are atomic (a reader sees the old object or the new one, never a part) and idempotent.
Transient errors are retried here, by one policy (``config.RetryPolicy``), and nowhere below: s3fs
and botocore make a single attempt per request. Credentials come from the environment or an AWS
profile and are never logged; the endpoint of an S3-compatible store from
``RAY_INSPECT_S3_ENDPOINT``, else botocore's own ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import posixpath
import random
import re
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator

import fsspec
from fsspec.core import url_to_fs
from tenacity import RetryCallState, retry, retry_if_exception

from ray_inspect.config import RetryPolicy

ENDPOINT_ENV = "RAY_INSPECT_S3_ENDPOINT"
RETRY = RetryPolicy()
_UMASK = os.umask(0)
os.umask(_UMASK)
log = logging.getLogger("ray_inspect")


class StorageError(OSError):
    """A URL could not be read or written; the message names the URL and the reason. ``transient``:
    the store kept failing (unreachable, timing out) until the retry policy gave up, as opposed to
    answering that the object is missing or may not be read."""

    transient = False


try:  # the S3 client's own errors: connection failures are not OSErrors and escape s3fs untranslated
    import s3fs
    from botocore.exceptions import BotoCoreError as _BotoCoreError
    from botocore.exceptions import ConnectionError as _BotoConnectionError
    from botocore.exceptions import HTTPClientError as _BotoHTTPError

    _CLIENT_TRANSIENT: tuple[type[BaseException], ...] = (
        _BotoConnectionError, _BotoHTTPError, *s3fs.core.S3_RETRYABLE_ERRORS)
    s3fs.S3FileSystem.retries = 1       # s3fs's own retry loops (requests, and reads of open files):
    s3fs.core.S3File.retries = 1        # one attempt, the policy above retries
except ImportError:  # pragma: no cover - s3fs not installed
    class _BotoCoreError(Exception):
        pass

    _CLIENT_TRANSIENT = ()


def _transient(exc: BaseException) -> bool:
    """Worth another try: timeouts, refused or dropped connections, throttling and server errors
    (which s3fs turns into plain OSErrors); not a missing object, a refusal or a bad request."""
    permanent = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                 FileExistsError, StorageError)
    if isinstance(exc, permanent):
        return False
    return isinstance(exc, (OSError, TimeoutError, ConnectionError, *_CLIENT_TRANSIENT))


class _Retries(threading.local):
    count = 0


_thread_retries = _Retries()
_retries_lock = threading.Lock()
_process_retries = [0]


_process_requests: dict[str, int] = {}


def count_request(action: str) -> None:
    """One more request to storage, by action ("list" pages, "read", "write", "check", "remove")."""
    with _retries_lock:
        _process_requests[action] = _process_requests.get(action, 0) + 1


def requests() -> dict[str, int]:
    """Requests this process made to storage so far, by action (retries not counted again). Listing
    pages count on object stores only (a local listing reads directories)."""
    with _retries_lock:
        return dict(_process_requests)


def retries() -> int:
    """Requests retried in this process so far (a process-wide, monotonic count)."""
    return _process_retries[0]


def thread_retries() -> int:
    """Requests retried by this thread so far: the difference across a piece of work is its count."""
    return _thread_retries.count


def _note_retry(state: RetryCallState) -> None:
    _thread_retries.count += 1
    with _retries_lock:
        _process_retries[0] += 1
    exc = state.outcome.exception() if state.outcome else None
    url = state.args[0] if state.args and isinstance(state.args[0], str) else "object storage"
    wait = state.next_action.sleep if state.next_action else 0.0
    log.warning("%s: %s; try %d of %d in %.1f s", url, short_reason(exc) if exc else "failed",
                state.attempt_number + 1, RETRY.attempts, wait)


def _out_of_attempts(state: RetryCallState) -> bool:
    return state.attempt_number >= RETRY.attempts


def _wait(state: RetryCallState) -> float:
    """The policy's backoff before the next try, plus random jitter."""
    return RETRY.wait(state.attempt_number) + random.uniform(0, RETRY.jitter)


retrying = retry(retry=retry_if_exception(_transient), stop=_out_of_attempts, wait=_wait,
                 before_sleep=_note_retry, reraise=True)


ENDPOINT_ENVS = (ENDPOINT_ENV, "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")   # the first one set wins


def s3_endpoint() -> str | None:
    """The S3-compatible endpoint from the environment: the project's variable, else botocore's own
    (``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``), so that every client (s3fs, pyarrow) uses the same."""
    return next((os.environ[k] for k in ENDPOINT_ENVS if os.environ.get(k)), None)


def storage_options(url: str) -> dict:
    """fsspec options for a URL: for S3, the endpoint from the environment and a client that tries
    each request once, with the policy's timeouts (``RETRY`` does the retrying)."""
    if not url.startswith(("s3://", "s3a://")):
        return {}
    client = {"retries": {"mode": "standard", "total_max_attempts": 1},
              "connect_timeout": RETRY.connect_timeout, "read_timeout": RETRY.read_timeout}
    endpoint = s3_endpoint()
    return {"config_kwargs": client, **({"endpoint_url": endpoint} if endpoint else {})}


def get_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    return url_to_fs(url, **storage_options(url))


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def absolute(url: str) -> str:
    """Local paths made absolute (Ray workers run in other directories); other URLs unchanged."""
    return os.path.abspath(local_path(url)) if is_local(url) else url


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL (keeps the scheme)."""
    base = url.rstrip("/")
    for p in parts:
        base = posixpath.join(base, p.strip("/")) if "://" in base else os.path.join(base, p)
    return base


def _canonical(url: str) -> str:
    """A URL's place for comparison: local paths resolved (symlinks, ``..``), prefixes without a
    trailing slash."""
    if is_local(url):
        return os.path.realpath(local_path(url))
    scheme, rest = url.split("://", 1)
    return f"{scheme}://{posixpath.normpath('/' + rest).lstrip('/')}"


def contains(outer: str, inner: str) -> bool:
    """Whether ``inner`` is ``outer`` or lies below it (``s3://b/a`` holds ``s3://b/a/x``, not
    ``s3://b/ab``)."""
    o, i = _canonical(outer), _canonical(inner)
    if is_local(outer) != is_local(inner):
        return False
    return i == o or i.startswith(o.rstrip("/") + "/")


def short_reason(exc: BaseException) -> str:
    """An exception in a few words for a one-line error: its first line (at most 200 characters),
    or its class name when it has no message."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else exc.__class__.__name__)[:200]


_FAILURES = (OSError, ValueError, _BotoCoreError, *_CLIENT_TRANSIENT)


def _error(url: str, exc: BaseException, action: str) -> StorageError:
    """A one-line StorageError naming the URL and the reason (never credentials)."""
    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, FileNotFoundError):
        return StorageError(f"{url}: no such file or object")
    if isinstance(exc, PermissionError):
        return StorageError(f"{url}: permission denied")
    if isinstance(exc, IsADirectoryError):
        return StorageError(f"{url}: is a directory")
    error = StorageError(f"{url}: cannot {action} ({short_reason(exc)})")
    error.transient = _transient(exc)
    return error


def _storage_call(action: str):
    """Retry transient errors with backoff, then turn any failure into one StorageError line."""
    def deco(fn):
        retried = retrying(fn)

        @functools.wraps(fn)
        def wrapper(url: str, *args, **kwargs):
            if action != "list":          # a listing counts its pages
                count_request(action)
            try:
                return retried(url, *args, **kwargs)
            except _FAILURES as exc:
                raise _error(url, exc, action) from None
        return wrapper
    return deco


@_storage_call("read")
def read_bytes(url: str) -> bytes:
    """Whole object; a missing or unreadable URL raises StorageError naming it."""
    fs, path = get_fs(url)
    return fs.cat_file(path)


def _replace_locally(path: str, fill) -> None:
    """Write a temporary sibling with ``fill(file)``, flush it to disk, then rename it into place."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@_storage_call("write")
def write_bytes(url: str, data: bytes) -> None:
    """Atomic write: a temporary sibling renamed into place locally, one PUT on object storage."""
    if is_local(url):
        _replace_locally(local_path(url), lambda f: f.write(data))
        return
    fs, path = get_fs(url)
    fs.pipe_file(path, data)  # S3 PutObject is all-or-nothing


@_storage_call("write")
def put_file(url: str, local: str) -> None:
    """Atomic upload of a local file (for outputs too large to hold in memory)."""
    if is_local(url):
        def copy(f):
            with open(local, "rb") as src:
                shutil.copyfileobj(src, f, 16 << 20)
        _replace_locally(local_path(url), copy)
        return
    fs, path = get_fs(url)
    fs.put_file(local, path)  # a single or multipart upload: visible only once complete


def write_text(url: str, text: str) -> None:
    write_bytes(url, text.encode())


def read_text(url: str) -> str:
    return read_bytes(url).decode()


@_storage_call("check")
def exists(url: str) -> bool:
    fs, path = get_fs(url)
    return fs.exists(path)


@_storage_call("check")
def isdir(url: str) -> bool:
    fs, path = get_fs(url)
    return fs.isdir(path)


@_storage_call("list")
def find(url: str) -> list[str]:
    """All files below a prefix, recursively, as full URLs in sorted order."""
    fs, path = get_fs(url)
    if not fs.exists(path):
        raise StorageError(f"{url}: no such directory or prefix")
    files = fs.find(path)
    proto = url.split("://", 1)[0] + "://" if "://" in url and not url.startswith("file://") else ""
    if url.startswith("file://"):
        proto = "file://"
    return sorted(proto + f if proto and not f.startswith(proto) else f for f in files)


LIST_PAGE = 1000          # objects per listing page (S3's largest)


def iter_versions(url: str, start_after: str | None = None) -> Iterator[tuple[str, str]]:
    """Every file below a prefix with its version tag (size and ETag or mtime: a changed input
    gets a new tag, so a rerun does not keep results of the old one), in key order (by code
    point, as S3 lists), a page at a time: memory does not grow with the prefix. Each page is one
    request, retried by the policy. ``start_after``: a key relative to ``url``; listing resumes
    after it."""
    if not is_local(url):
        yield from _iter_s3(url, start_after)
        return
    root = os.path.abspath(local_path(url))
    if not os.path.isdir(root):
        raise StorageError(f"{url}: no such directory or prefix")
    prefix = "file://" if url.startswith("file://") else ""
    for rel, st in _walk_sorted(root, ""):
        if start_after is None or rel > start_after:
            yield prefix + os.path.join(root, rel), _version_tag(st.st_size, st.st_mtime)


def _walk_sorted(root: str, rel: str) -> Iterator[tuple[str, os.stat_result]]:
    """Files below ``root/rel`` as (relative path, stat) in the order of their whole relative paths:
    a folder's entries sort by name + "/" (``a.png`` before ``a/x.png``, as an S3 listing has them)."""
    try:
        with os.scandir(os.path.join(root, rel)) as it:
            entries = [(e.name + "/" if e.is_dir(follow_symlinks=True) else e.name, e) for e in it]
    except OSError as exc:
        raise _error(os.path.join(root, rel), exc, "list") from None
    for name, entry in sorted(entries, key=lambda t: t[0]):
        path = rel + name
        if name.endswith("/"):
            yield from _walk_sorted(root, path)
        else:
            try:
                yield path, entry.stat(follow_symlinks=True)
            except OSError:                   # vanished or a dangling link: not a file to scan
                continue


def _iter_s3(url: str, start_after: str | None) -> Iterator[tuple[str, str]]:
    fs, path = get_fs(url)
    bucket, _, key = path.partition("/")
    prefix = key.rstrip("/") + "/" if key else ""
    scheme = url.split("://", 1)[0]
    args = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": LIST_PAGE}
    if start_after is not None:
        args["StartAfter"] = prefix + start_after
    listed = False
    while True:
        page = _list_page(url, fs, args)
        for obj in page.get("Contents", []):
            listed = True
            if not obj["Key"].endswith("/"):
                yield f"{scheme}://{bucket}/{obj['Key']}", _version_tag(obj.get("Size"), obj.get("ETag", ""))
        if not page.get("IsTruncated"):
            break
        args = {**args, "ContinuationToken": page["NextContinuationToken"]}
        args.pop("StartAfter", None)
    if not listed and start_after is None and not fs.exists(path):
        raise StorageError(f"{url}: no such directory or prefix")


@_storage_call("list")
def _list_page(url: str, fs, args: dict) -> dict:
    count_request("list")
    return fs.call_s3("list_objects_v2", **args)


@_storage_call("check")
def version(url: str) -> str:
    """One file's version tag, as a listing gives it (size and ETag or mtime)."""
    fs, path = get_fs(url)
    info = fs.info(path)
    if info.get("type") == "directory":
        raise IsADirectoryError(url)
    tag = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or ""
    return _version_tag(info.get("size"), tag)


def _version_tag(size, tag) -> str:
    """An input's version as listings and ``version`` give it: size, then ETag (unquoted) or mtime."""
    return f"{size}-{str(tag).strip(chr(34))}"


def relative(url: str, root: str) -> str:
    """Path of ``url`` below ``root``, with forward slashes. Names that merely start with two dots
    (``..hidden.png``) are below it; a ``..`` segment is not."""
    if is_local(url) and is_local(root):
        rel = os.path.relpath(os.path.abspath(local_path(url)), os.path.abspath(local_path(root)))
        rel = rel.replace(os.sep, "/")
    else:
        u, r = url.split("://", 1)[-1], root.split("://", 1)[-1].rstrip("/")
        rel = u[len(r) + 1:] if u.startswith(r + "/") else ".."
    if rel == ".." or rel.startswith("../"):
        raise ValueError(f"{url} is not below {root}")
    return rel


# Output names: any key from outside becomes a relative path whose segments are safe to create
# under any root, locally or on object storage, and distinct keys stay distinct.
SEGMENT_BYTES = 200        # a segment plus the longest output suffix stays under NAME_MAX (255)
PATH_BYTES = 700           # OUT's prefix plus a stem stays under S3's 1,024-byte keys
_RESERVED = {"%": "%25", "\\": "%5C"}


def _escape(ch: str) -> str:
    """One character of a key: ``%`` and backslashes escaped, control characters and the bytes of a
    non-UTF-8 local name (Python's surrogate escapes) percent-encoded, everything else kept."""
    if ch in _RESERVED:
        return _RESERVED[ch]
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:              # an undecodable byte of a local file name
        return f"%{code - 0xDC00:02X}"
    if 0xD800 <= code <= 0xDFFF:              # any other lone surrogate (no file system or S3 makes one)
        return f"%u{code:04X}"
    if code < 0x20 or code == 0x7F:
        return f"%{code:02X}"
    return ch


def _capped(name: str, limit: int) -> str:
    """``name`` if it fits ``limit`` UTF-8 bytes, else a prefix that fits plus ``%~`` and a hash of
    the whole name. Escaped text never holds ``%~`` (every ``%`` in it starts an escape), so a
    capped name is never another key's uncapped one, and two long names that share the prefix differ."""
    if len(name.encode()) <= limit:
        return name
    digest = "%~" + hashlib.sha256(name.encode()).hexdigest()[:16]
    keep = name.encode()[: limit - len(digest)].decode(errors="ignore")
    return keep.rstrip("/") + digest


def cap_name(name: str) -> str:
    """A file name cut to fit any file system (``SEGMENT_BYTES`` plus an output suffix)."""
    return _capped(name, SEGMENT_BYTES)


_UNSAFE = re.compile(r"[%\\\x00-\x1f\x7f\ud800-\udfff]|//|^/|/$|(^|/)\.\.?(/|$)")


def _plain(key: str) -> bool:
    """A key that ``safe_path`` keeps as it is (most keys): nothing to escape, no empty, ``.`` or
    ``..`` segment, short segments (checked by characters first, bytes only when it might matter)."""
    if not key or _UNSAFE.search(key):
        return False
    if len(key) * 4 <= SEGMENT_BYTES:
        return True
    return len(key.encode()) <= PATH_BYTES and all(len(p.encode()) <= SEGMENT_BYTES for p in key.split("/"))


def safe_path(key: str) -> str:
    """The relative output path of an input key: segments joined by ``/``, none empty, ``.`` or
    ``..``, so that joined onto OUT it stays below OUT.

    Empty segments (``a//b``, a leading ``/``) fold into the next one as ``%2F``; ``.`` and ``..``
    become ``%2E`` and ``%2E%2E``; ``%``, backslashes, control characters and undecodable bytes are
    percent-encoded; segments and the whole path are capped in length. The mapping is one-to-one
    up to the capping's hash.
    """
    return key if _plain(key) else _escaped_path(key)


def _escaped_path(key: str) -> str:
    segments, pending = [], ""
    for seg in "".join(_escape(c) for c in key).split("/"):
        if not seg:
            pending += "%2F"
            continue
        seg = pending + seg
        pending = ""
        if seg in (".", ".."):
            seg = seg.replace(".", "%2E")
        segments.append(_capped(seg, SEGMENT_BYTES))
    if pending:                               # a key that ends in "/"
        segments = [*segments[:-1], _capped(segments[-1] + pending, SEGMENT_BYTES)] if segments \
            else [_capped(pending, SEGMENT_BYTES)]
    return _capped("/".join(segments), PATH_BYTES)


@_storage_call("remove")
def remove(url: str, recursive: bool = False) -> None:
    fs, path = get_fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


def makedirs(url: str) -> None:
    if is_local(url):
        os.makedirs(local_path(url), exist_ok=True)


def unique_suffix() -> str:
    return uuid.uuid4().hex[:12]
