"""The typed records between the scan's parts: their JSON is the files' format, byte for byte."""

import json
from collections import deque

import numpy as np
from PIL import Image

from ray_inspect.config import InspectConfig, MetricsConfig, ModelConfig, ScanOptions
from ray_inspect.distributed import scan as driver
from ray_inspect.io.artifact import ModelCard
from ray_inspect.io.storage import StorageError
from ray_inspect.records import FailureKind, ImageRecord, InputError, Outcome, ScanError

COMMON = {"key": "test/cut/000.png", "stem": "test/cut/000", "url": "/data/test/cut/000.png",
          "version": "7-1.5", "status": "ok", "fingerprint": "f00d", "defect_type": "cut",
          "mask_url": "/data/gt/000_mask.png",
          "score": 0.75, "height": 256, "width": 256, "tiles": 49, "bands": 1, "threshold": 0.5,
          "bytes_read": 1234, "max_rss_bytes": 1 << 30}
TAIL = {"bytes_written": 999, "timings": {"read": 0.1, "inference": 0.2, "write": 0.01}, "worker": "h:1",
        "finished": 1700000000.5}


def test_image_record_json_is_the_record_as_written_before():
    """Optional keys appear only where the scan adds them, in the same place."""
    cases = [
        {**COMMON, "score_opened": 0.5, "flagged_pixels": 10, "regions": 2, **TAIL},  # labelled, threshold
        {**COMMON, "score_opened": 0.5, **TAIL, "threshold": None},                   # labelled
        {**COMMON, "flagged_pixels": 0, "regions": 0, **TAIL},                        # threshold
        {**COMMON, **TAIL},                                                           # neither
    ]
    for old in cases:
        record = ImageRecord(**{**old, "status": Outcome.OK})
        assert record.to_json() == json.dumps(old)
        assert ImageRecord.from_json(json.dumps(old)) == record
    assert ImageRecord.from_dict({**cases[0], "from_a_later_version": 1}) == ImageRecord(**cases[0])


def test_scan_error_line_and_failure_kinds():
    err = ScanError("k.png", "/d/k.png", "empty file (0 bytes)", FailureKind.EMPTY)
    assert err.to_json() == json.dumps({"key": "k.png", "url": "/d/k.png", "reason": "empty file (0 bytes)",
                                        "kind": "empty"})
    assert InputError("u", "r", "no such word").kind is FailureKind.OTHER
    assert InputError("u", "r", FailureKind.MASK).kind == "mask" and str(InputError("u", "r")) == "u: r"
    assert json.dumps([Outcome.OK, Outcome.MISSING]) == '["ok", "missing"]'


class _Recorder:
    def __init__(self):
        self.images, self.failures, self.listings = [], [], []

    def listed(self, images, skipped, complete):
        self.listings.append((images, skipped, complete))

    def image(self, record):
        self.images.append(record.key)

    def failed(self, kind):
        self.failures.append(kind)

    def storage_retries(self, n):
        raise AssertionError(f"no storage request was retried, yet {n} were reported")


def test_driver_accounts_every_image_once_and_writes_errors_and_manifest(tmp_path):
    """The driver's handlers without Ray: scanned, lost too often, failed on storage."""
    for name in ("a", "b", "c"):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / f"{name}.png")
    out = str(tmp_path / "out")
    card = ModelCard(model=ModelConfig(), resize=None)
    plan = driver.ScanPlan(str(tmp_path), str(tmp_path), out, card, InspectConfig(), 0.5, MetricsConfig(),
                           "fp")
    telemetry, progress, errors = _Recorder(), [], []
    run = driver._Run.create(plan, ScanOptions(max_attempts=2), {
        "telemetry": telemetry, "progress": progress.append, "on_error": errors.append}, 0.0)
    a, b, c = list(driver._source(run))
    assert run.tally.listed == 3 and run.tally.listing_done and telemetry.listings == [(3, 0, True)]
    record = ImageRecord(**{**COMMON, **TAIL, "key": "a.png", "stem": "a", "tiles": 5})
    driver._scanned(run, a, driver.ScanResult(Outcome.OK, record))
    queue = deque()
    driver._lost(run, queue, b, RuntimeError())
    assert list(queue) == [b] and run.retried == 1 and run.tally.counts[Outcome.ERROR] == 0
    driver._lost(run, queue, b, RuntimeError())
    driver._failed(run, c, StorageError("s3://x/c.png: slow down\nmore"))
    summary = driver._finalise(run, driver._pool_shape(ScanOptions(), {"CPU": 2}), 1)

    lines = (tmp_path / "out" / "errors.jsonl").read_text()
    assert lines == (
        json.dumps({"key": "b.png", "url": b.sample.url, "reason": "its worker died 2 times (RuntimeError)",
                    "kind": "worker_died"}) + "\n" +
        json.dumps({"key": "c.png", "url": c.sample.url, "reason": "s3://x/c.png: slow down",
                    "kind": "storage"}) + "\n")
    assert [e.kind for e in errors] == [FailureKind.WORKER_DIED, FailureKind.STORAGE]
    assert telemetry.images == ["a.png"] and telemetry.failures == [e.kind for e in errors]
    assert [(p.done, p.total, p.key, p.outcome, p.failed, p.tiles) for p in progress] == [
        (1, 3, "a.png", "ok", 0, 5), (2, 3, "b.png", "error", 1, 5), (3, 3, "c.png", "error", 2, 5)]
    assert [(e["key"], e["status"]) for e in driver.manifest_entries(out)] == [
        ("a.png", "ok"), ("b.png", "error"), ("c.png", "error")]
    ledger = driver.Ledger(out, "fp")
    assert ledger.load() == 1 and ("a.png", a.sample.version) in ledger
    assert ("b.png", b.sample.version) not in ledger
    assert (summary["scanned"], summary["failed"], summary["retried"], summary["tiles"]) == (1, 2, 2, 5)
    assert summary["exit_code"] == driver.EXIT_PARTIAL and (tmp_path / "out" / "_SUCCESS").exists()


def test_allowing_bad_inputs_forgives_bad_files_only():
    """--allow-bad-inputs: exit 0 when every failure is the file's fault; a store that stayed
    unreachable, a lost actor, a bug or an unknown kind still exit 3."""
    def errors(*kinds):
        return [ScanError(f"{k}.png", f"/d/{k}.png", "r", FailureKind.of(k)) for k in kinds]

    bad_files = errors("corrupt", "empty", "size", "format", "unreadable", "mask")
    assert driver._exit_code([], False) == driver._exit_code([], True) == driver.EXIT_OK
    assert driver._exit_code(bad_files, False) == driver.EXIT_PARTIAL
    assert driver._exit_code(bad_files, True) == driver.EXIT_OK
    for kind in ("storage", "worker_died", "timeout", "internal", "something-new"):
        assert driver._exit_code(bad_files + errors(kind), True) == driver.EXIT_PARTIAL, kind
    assert driver._exit_code(bad_files + errors("missing"), True) == driver.EXIT_OK   # a key with no object
    not_bad_inputs = [k.value for k in FailureKind if not k.bad_input]
    assert not_bad_inputs == ["storage", "worker_died", "timeout", "internal", "other"]
