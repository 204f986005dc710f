"""Typed records between the scan's parts: what an image's scan produced, how it ended, why it failed.

The scan actors build them, the driver's ledger and telemetry consume them, and ``report`` reads
them back from OUT; their JSON forms are the files under ``records/`` and ``errors.jsonl``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any, Self


class _Vocabulary(StrEnum):
    """A fixed vocabulary of metric label values whose last member is its catch-all."""

    @classmethod
    def of(cls, word: object) -> Self:
        """``word`` as a member; words outside the vocabulary become the last member."""
        try:
            return cls(str(word))
        except ValueError:
            return list(cls)[-1]


class FailureKind(_Vocabulary):
    """Why an image was not scanned: a fixed vocabulary (a metric label never carries file names)."""

    EMPTY = "empty"
    CORRUPT = "corrupt"
    UNREADABLE = "unreadable"
    MODE = "mode"
    NAN = "nan"
    RANGE = "range"
    SIZE = "size"
    MASK = "mask"
    INVALID = "invalid"
    READ = "read"
    DECODE = "decode"
    FORMAT = "format"
    MISSING = "missing"           # a key of --keys with no such object
    STORAGE = "storage"
    WORKER_DIED = "worker_died"
    TIMEOUT = "timeout"           # not done within --image-timeout (its actor is replaced)
    INTERNAL = "internal"
    OTHER = "other"               # the catch-all: any other word

    @property
    def bad_input(self) -> bool:
        """The file itself is at fault (what ``--allow-bad-inputs`` accepts); not a store that stayed
        unreachable, an actor lost, a bug, or a kind this version does not know."""
        return self not in (FailureKind.STORAGE, FailureKind.WORKER_DIED, FailureKind.TIMEOUT,
                            FailureKind.INTERNAL, FailureKind.OTHER)


class RunFailure(_Vocabulary):
    """Why a whole run failed, by the stage it reached (a metric label): its model, its source, the
    cluster, the resources it waited for, an object store that stayed unreachable, an interruption,
    or anything else while it ran."""

    MODEL = "model"
    SOURCE = "source"
    CLUSTER = "cluster"
    RESOURCES = "resources"
    STORAGE = "storage"
    INTERRUPTED = "interrupted"
    BUSY = "busy"                 # another scan holds OUT's lease
    INTERNAL = "internal"         # the catch-all: anything else


class InputError(ValueError):
    """A bad input file; str() is one line naming the file and the problem."""

    def __init__(self, url: str, reason: str, kind: FailureKind | str = FailureKind.INVALID):
        super().__init__(f"{url}: {reason}")
        self.url, self.reason, self.kind = url, reason, FailureKind.of(kind)


class Outcome(StrEnum):
    """How one image's work ended: on an actor (OK, ERROR), in the pool (LOST with its actor,
    FAILED with an exception) and in the driver's ledger (SKIPPED as already done, MISSING)."""

    OK = "ok"
    ERROR = "error"
    LOST = "lost"
    FAILED = "failed"
    SKIPPED = "skipped"
    MISSING = "missing"


@dataclass(frozen=True)
class ScanProgress:
    """Where a scan stands after one more image ended: counts of the whole listing."""

    done: int                  # images ended (scanned, skipped as complete, failed)
    total: int
    key: str                   # the image that just ended
    outcome: Outcome
    skipped: int = 0           # complete before this run (resumed)
    failed: int = 0            # bad input or lost
    tiles: int = 0             # windows run in this run
    listing: bool = False      # the listing goes on: ``total`` is the images listed so far


@dataclass(frozen=True)
class ScanError:
    """One line of ``errors.jsonl``: an image that was not scanned, and why."""

    key: str
    url: str
    reason: str
    kind: FailureKind

    def to_json(self) -> str:
        return json.dumps({"key": self.key, "url": self.url, "reason": self.reason, "kind": str(self.kind)})


_OPTIONAL = ("score_opened", "flagged_pixels", "regions")   # present only when they apply


@dataclass(frozen=True)
class ImageRecord:
    """What one image's scan produced (``records/<stem>.json``, written last: present with the
    scan's fingerprint and the input's version, it marks the image complete)."""

    key: str
    stem: str
    url: str
    version: str
    status: str
    fingerprint: str
    defect_type: str | None
    mask_url: str | None
    score: float
    height: int
    width: int
    tiles: int
    bands: int
    threshold: float | None
    bytes_read: int
    max_rss_bytes: int
    score_opened: float | None = None      # labelled images: max of the opened residual
    flagged_pixels: int | None = None      # with a threshold: pixels of the mask
    regions: int | None = None             # with a threshold: 8-connected regions of the mask
    bytes_written: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    worker: str = ""
    finished: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if not (f.name in _OPTIONAL and getattr(self, f.name) is None)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImageRecord:
        """A record read back from OUT (keys this version does not know are ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def from_json(cls, text: str) -> ImageRecord:
        return cls.from_dict(json.loads(text))
