"""The resume ledger of a scan: which images it completed, in a few compact objects.

``OUT/ledger/<fingerprint>/<name>.jsonl`` holds one JSON line per completed image,
``[key, version, stem]``; a scan appends one object per shard of its listing (never rewrites one),
so a rerun reads O(images / shard) objects instead of one record per image. In memory the driver
keeps a 16-byte digest of each (key, version): a rerun over millions of images holds megabytes.
Objects of small shards (nights that added a few images here and there) are merged into full ones
when they outnumber what the entries need (``compact``).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Iterator

import numpy as np

from ray_inspect.io import storage

SEGMENT = 1000                    # entries per merged ledger object
SLACK = 10                        # objects beyond entries / SEGMENT before they are merged


def digest(key: str, version: str) -> bytes:
    """16 bytes that identify one input as listed (its key and version)."""
    return hashlib.blake2b(json.dumps([key, version]).encode(), digest_size=16).digest()


class Ledger:
    """Completed images of one scan (one fingerprint) below OUT."""

    def __init__(self, out: str, fingerprint: str, run: str | None = None):
        self.root = storage.join(out, "ledger", fingerprint)
        self.run = run or f"{int(time.time()):x}-{storage.unique_suffix()}"
        self.objects = 0
        self.entries = 0
        self._seq = 0
        self._hi = self._lo = np.empty(0, np.uint64)

    def names(self) -> list[str]:
        """URLs of the ledger's objects (one listing of the ledger folder; empty when none)."""
        if not storage.exists(self.root):
            return []
        return [u for u, _ in storage.iter_versions(self.root) if u.endswith(".jsonl")]

    def load(self) -> int:
        """Read every object of the ledger; returns the entries read. Unreadable lines are ignored
        (their images are scanned again)."""
        found = bytearray()
        names = self.names()
        for url in names:
            for key, version, _ in _entries(storage.read_text(url)):
                found += digest(key, version)
        keys = np.frombuffer(bytes(found), ">u8").reshape(-1, 2).astype(np.uint64)   # native: fast search
        order = np.lexsort((keys[:, 1], keys[:, 0]))
        self._hi, self._lo = np.ascontiguousarray(keys[order, 0]), np.ascontiguousarray(keys[order, 1])
        self.objects, self.entries = len(names), len(keys)
        return self.entries

    def __contains__(self, item: tuple[str, str]) -> bool:
        if not len(self._hi):
            return False
        d = digest(*item)
        hi, lo = np.uint64(int.from_bytes(d[:8], "big")), np.uint64(int.from_bytes(d[8:], "big"))
        a, b = np.searchsorted(self._hi, hi, "left"), np.searchsorted(self._hi, hi, "right")
        return bool((self._lo[a:b] == lo).any())

    def append(self, entries: Iterable[tuple[str, str, str]], prefix: str = "") -> None:
        """One more object with these (key, version, stem) entries (none: nothing written)."""
        text = "".join(json.dumps(list(e)) + "\n" for e in entries)
        if text:
            self._seq += 1
            storage.write_text(storage.join(self.root, f"{prefix}{self.run}-{self._seq:06d}.jsonl"), text)
            self.objects += 1
            self.entries += text.count("\n")

    def fragmented(self) -> bool:
        """Whether the objects outnumber what the entries need (``SLACK`` more than full ones)."""
        return self.objects > self.entries // SEGMENT + SLACK

    def compact(self) -> int:
        """Merge the ledger's objects into full ones of ``SEGMENT`` entries (written before the old
        ones are removed, so an interruption leaves duplicates, never a gap); returns objects removed."""
        old = self.names()
        self.objects = self.entries = 0
        buffer: list[tuple[str, str, str]] = []
        for url in old:
            buffer += _entries(storage.read_text(url))
            while len(buffer) >= SEGMENT:
                self.append(buffer[:SEGMENT], prefix="m")
                buffer = buffer[SEGMENT:]
        self.append(buffer, prefix="m")
        for url in old:
            storage.remove(url)
        return len(old)


def _entries(text: str) -> Iterator[tuple[str, str, str]]:
    for line in text.splitlines():
        try:
            key, version, stem = json.loads(line)
        except (ValueError, TypeError):
            continue
        if isinstance(key, str) and isinstance(version, str) and isinstance(stem, str):
            yield key, version, stem
