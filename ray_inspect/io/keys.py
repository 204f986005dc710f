"""Files of keys to scan instead of a listing: plain text, or CSV in the S3 Inventory layout.

Text: one key per line, relative to SOURCE; blank lines and lines that start with ``#`` are
skipped. CSV (``*.csv``, ``*.csv.gz``): the S3 Inventory layout, each row ``bucket, key, ...``
with the key URL-encoded and relative to the bucket, so for ``SOURCE=s3://b/p`` a row's key must
lie below ``p/``; for a local SOURCE the key is relative to SOURCE. The file is read as a stream
(local or s3://), so its size does not matter; ``keyed_samples`` finds each key's version with a
bounded number of requests in flight.
"""

from __future__ import annotations

import csv
import gzip
import io
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import unquote_plus

from ray_inspect.io import storage
from ray_inspect.io.datasets import Sample, is_mvtec_root, mvtec_sample

LOOKUPS = 32               # version requests in flight at once
BATCH = 512                # keys looked up per batch (kept in order)


def read_keys(url: str, source: str) -> Iterator[str]:
    """The keys that ``url`` lists, relative to ``source``, in the file's order. A CSV key outside
    ``source`` is yielded as it is in the file, prefixed with ``../`` so that it fails as missing."""
    name = url.lower()
    with _open(url) as raw, _text(raw, name.endswith(".gz")) as stream:
        if name.endswith((".csv", ".csv.gz")):
            yield from _csv_keys(stream, source)
        else:
            for line in stream:
                key = line.rstrip("\r\n")
                if key.strip() and not key.startswith("#"):
                    yield key


def _text(raw, gzipped: bool):
    return gzip.open(raw, "rt", encoding="utf-8", newline="") if gzipped else \
        io.TextIOWrapper(raw, encoding="utf-8", newline="")


def _open(url: str):
    fs, path = storage.get_fs(url)
    try:
        return fs.open(path, "rb")
    except (OSError, ValueError) as exc:
        reason = storage.short_reason(exc)
        raise storage.StorageError(f"{url}: cannot read the keys file ({reason})") from None


def _csv_keys(stream, source: str) -> Iterator[str]:
    prefix = ""
    if not storage.is_local(source):
        prefix = source.split("://", 1)[1].partition("/")[2].strip("/")
        prefix = prefix + "/" if prefix else ""
    for row in csv.reader(stream):
        if len(row) < 2 or not row[1]:
            continue
        key = unquote_plus(row[1])
        yield key[len(prefix):] if key.startswith(prefix) else "../" + key


def keyed_samples(source: str, keys: Iterator[str]) -> Iterator[tuple[Sample, str | None]]:
    """(sample, problem) for each key: the sample as a listing would give it (with its version;
    with ground truth for ``test/`` keys of an MVTec root), and None, or a reason when there is no
    such image."""
    mvtec = is_mvtec_root(source)
    with ThreadPoolExecutor(LOOKUPS) as pool:
        batch: list[str] = []
        for key in keys:
            batch.append(key)
            if len(batch) == BATCH:
                yield from pool.map(lambda k: _sample(source, k, mvtec), batch)
                batch = []
        yield from pool.map(lambda k: _sample(source, k, mvtec), batch)


def _sample(source: str, key: str, mvtec: bool) -> tuple[Sample, str | None]:
    if ".." in key.split("/") or key.startswith("/"):
        return Sample(f"{source.rstrip('/')}/{key}", key), "not below the source"
    url = storage.join(source, key)
    try:
        version = storage.version(url)
    except storage.StorageError as exc:
        return Sample(url, key), storage.short_reason(exc)
    if mvtec and key.startswith("test/"):
        return mvtec_sample(source, key[len("test/"):], url, version), None
    return Sample(url, key, version=version), None
