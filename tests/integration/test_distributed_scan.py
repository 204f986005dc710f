"""The scan on Ray actors: S3 to S3, resume after a killed driver, a killed actor, reruns."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from helpers.scans import assert_outputs_equal, output_stem_list
from ray_inspect.cli import main
from ray_inspect.config import InspectConfig, MetricsConfig, ScanOptions, SynthConfig
from ray_inspect.core.evaluation import Evaluation
from ray_inspect.distributed.scan import (
    EXIT_OK,
    _actor_env,
    _Pool,
    _pool_shape,
    _Shape,
    manifest_entries,
    scan,
    scan_fingerprint,
)
from ray_inspect.io import storage
from ray_inspect.io.artifact import read_card
from ray_inspect.io.datasets import list_samples
from ray_inspect.steps.imagescan import ScanTarget, output_stems, output_urls, scan_image
from ray_inspect.steps.inspector import Inspector

CFG = InspectConfig(precision="bfloat16")


class Recorder:
    """A telemetry that remembers what the scan reported."""

    def __init__(self):
        self.images, self.failures, self.finished, self.retries = [], [], None, 0

    def start(self, info): self.info = info
    def listed(self, images, skipped, complete): self.listing = (images, skipped, complete)
    def actors(self, n): pass
    def in_flight(self, n): pass
    def image(self, record): self.images.append(record.key)
    def failed(self, kind): self.failures.append(kind)
    def storage_retries(self, n): self.retries += n
    def finish(self, summary, ok): self.finished = ok


def reference_scan(model_url, source, out, cfg=CFG, threads=1):
    """Single process, no Ray: scan_image on every sample, statistics summed in listing order.
    oneDNN's bf16 convolutions round differently with another thread count, so the reference
    uses the threads of one actor of the scan it is compared with."""
    import torch

    from ray_inspect import load_model

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _reference_scan(load_model, model_url, source, out, cfg)
    finally:
        torch.set_num_threads(before)


def _reference_scan(load_model, model_url, source, out, cfg):
    model = load_model(model_url)
    insp = Inspector(model, model.card, cfg)
    fp = scan_fingerprint(model.card, cfg, model.card.threshold, MetricsConfig())
    samples = list_samples(source)
    stems = output_stems([s.key for s in samples])
    total = Evaluation(model.card.score_range)
    records = {}
    for s in samples:
        rec, stats = scan_image(insp, s, stems[s.key], ScanTarget(out, fp))
        records[stems[s.key]] = rec.to_dict()
        if stats is not None:
            total += Evaluation.from_bytes(stats)
    return records, total.metrics()


@pytest.mark.slow
def test_s3_to_s3_with_two_actors_equals_a_single_process_scan(ray_session, s3, calibrated, dataset,
                                                                tmp_path):
    from ray_inspect.io.synth import generate

    src = s3.url("fleet", storage.unique_suffix(), "plain")
    # the images of the dataset fixture
    generate(src, SynthConfig(size=256, train=12, test_defective=8, test_good=4, validation=4, seed=3))
    model_url = s3.url("fleet-models", storage.unique_suffix())
    for f in Path(calibrated[0]).iterdir():
        storage.write_bytes(storage.join(model_url, f.name), f.read_bytes())
    out = s3.url("fleet-out", storage.unique_suffix())
    rec = Recorder()
    summary = scan(model_url, src, out, CFG, options=ScanOptions(workers=2), telemetry=rec)
    assert summary["workers"] == 2 and summary["scanned"] == 12 and summary["exit_code"] == EXIT_OK
    assert sorted(rec.images) == sorted(s.key for s in list_samples(src)) and rec.finished is True
    local = str(tmp_path / "ref")
    ref_records, ref_metrics = reference_scan(calibrated[0], dataset, local)
    assert json.loads(storage.read_text(storage.join(out, "metrics.json"))) == ref_metrics
    assert_outputs_equal(out, local, ref_records)
    for stem, ref in ref_records.items():
        got = json.loads(storage.read_text(output_urls(out, stem)["record"]))
        for k in ("score", "score_opened", "flagged_pixels", "regions", "tiles", "height", "width",
                  "fingerprint"):
            assert got[k] == ref[k], (stem, k)
    assert storage.exists(storage.join(out, "_SUCCESS"))
    assert storage.exists(storage.join(out, "stats", "shard-00000.npz"))
    entries = list(manifest_entries(out))
    assert {e["status"] for e in entries} == {"ok"} and len(entries) == 12


@pytest.mark.slow
def test_killed_actor_images_retried_and_counted_once(ray_session, calibrated, archive, clean, tmp_path):
    import psutil
    import ray

    out = tmp_path / "out"
    killed = []

    def killer():
        deadline = time.time() + 120
        while time.time() < deadline and len(list((out / "records").glob("**/*.json"))) < 4:
            time.sleep(0.02)
        actors = [p for p in psutil.process_iter(["cmdline"])       # Ray titles actor processes ray::Class
                  if p.info["cmdline"] and p.info["cmdline"][0].startswith("ray::ScanActor")]
        if actors:
            os.kill(actors[0].pid, signal.SIGKILL)
            killed.append(actors[0].pid)

    t = threading.Thread(target=killer)
    t.start()
    rec = Recorder()
    summary = scan(calibrated[0], archive, str(out), CFG, options=ScanOptions(workers=2, depth=2),
                   telemetry=rec)
    t.join()
    assert killed and summary["retried"] >= 1                 # the actor held images when it died
    assert summary["scanned"] == 40 and summary["failed"] == 0 and summary["exit_code"] == EXIT_OK
    assert len(rec.images) == 40 and len(set(rec.images)) == 40
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 40 and metrics == json.loads(Path(clean[2], "metrics.json").read_text())
    assert_outputs_equal(str(out), clean[2], output_stem_list(archive))
    assert ray.is_initialized()


@pytest.mark.slow
def test_an_s3_outage_mid_scan_is_ridden_out_and_its_retries_counted(ray_session, s3, calibrated, archive,
                                                                    clean):
    """SeaweedFS is stopped for 10 s while the actors read and write through it, then started again
    on the same data: the scan finishes with the clean run's outputs, every image counted once, and
    the retries that carried it through in the summary and in Prometheus's counter."""
    from prometheus_client import CollectorRegistry

    from ray_inspect.telemetry import ScanMetrics, ScanTelemetry

    src, out = s3.url("outage", storage.unique_suffix()), s3.url("outage-out", storage.unique_suffix())
    for f in sorted(Path(archive).rglob("*")):
        if f.is_file():
            storage.write_bytes(storage.join(src, f.relative_to(archive).as_posix()), f.read_bytes())
    registry = CollectorRegistry()
    telemetry = ScanTelemetry(ScanMetrics(registry))
    down: dict[str, float] = {}

    def outage():
        with s3.outage():
            down["from"] = time.time()
            time.sleep(10)
        down["to"] = time.time()

    stopper = threading.Thread(target=outage)

    def progress(p):
        if p.done == 4 and not stopper.is_alive() and not down:
            stopper.start()

    summary = scan(calibrated[0], src, out, CFG, options=ScanOptions(workers=2), telemetry=telemetry,
                   progress=progress)
    finished = time.time()
    stopper.join()
    assert down["to"] - down["from"] >= 10 and finished > down["to"]     # the scan outlived the outage
    assert summary["scanned"] == 40 and summary["failed"] == 0 and summary["exit_code"] == EXIT_OK
    retries = summary["storage_retries"]
    assert retries >= 2                                    # both actors waited for the store
    assert registry.get_sample_value("ray_inspect_storage_retries_total") == retries
    assert registry.get_sample_value("ray_inspect_images_scanned_total") == 40
    metrics = json.loads(storage.read_text(storage.join(out, "metrics.json")))
    assert metrics == json.loads(Path(clean[2], "metrics.json").read_text())
    assert_outputs_equal(out, clean[2], output_stem_list(archive))


@pytest.mark.slow
def test_killed_driver_rerun_recomputes_only_what_was_missing(ray_session, calibrated, archive, clean,
                                                              tmp_path):
    """A second scan on the OUT of a running one exits 2 naming it; the first is SIGKILLed (its
    lease stays), and the same command takes the lease over and redoes only what was missing."""
    out = tmp_path / "out"
    cmd = [str(Path(sys.executable).parent / "ray-inspect"), "scan", calibrated[0], archive, str(out),
           "--workers", "1"]
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(list((out / "records").glob("**/*.json"))) < 10:
        time.sleep(0.02)
    second = CliRunner().invoke(main, cmd[1:])                  # the same command, while the first runs
    assert second.exit_code == 2 and len(second.stderr.strip().splitlines()) == 1, second.output
    assert f"in use by another scan, process {proc.pid} on " in second.stderr
    os.killpg(proc.pid, signal.SIGKILL)          # the driver and the local Ray it started
    proc.wait()
    assert not (out / "_SUCCESS").exists()
    done = _settled(out / "records")             # an actor may finish its image as its raylet goes
    assert 10 <= len(done) < 40
    summary = scan(calibrated[0], archive, str(out), CFG, options=ScanOptions(workers=1))   # the same command
    assert summary["skipped"] == len(done) and summary["scanned"] == 40 - len(done)
    assert all(p.stat().st_mtime_ns == m for p, m in done.items())          # complete images were not redone
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads(Path(clean[1], "metrics.json").read_text())
    assert_outputs_equal(str(out), clean[1], output_stem_list(archive))
    assert (out / "_SUCCESS").exists()


def test_keys_of_an_inventory_csv_are_scanned_exactly_and_missing_ones_recorded(ray_session, calibrated,
                                                                                 dataset, tmp_path):
    """--keys with 100,000 rows in the S3 Inventory CSV layout: the 4 that exist are scanned (and no
    other image of the source), the others are errors of kind ``missing``."""
    import csv

    src = tmp_path / "src"
    shutil.copytree(Path(dataset, "test", "good"), src)
    present = sorted(p.name for p in src.glob("*.png"))
    wanted = present[:4]
    keys = sorted([f"gone/{i:06d}.png" for i in range(100_000 - 4)] + wanted)    # as an inventory lists them
    rows = [["bucket", k, "1", "2026-12-01T00:00:00.000Z"] for k in keys]
    inventory = tmp_path / "inventory.csv"
    with open(inventory, "w", newline="") as f:
        csv.writer(f, quoting=csv.QUOTE_ALL).writerows(rows)
    out = tmp_path / "out"
    rec = Recorder()
    summary = scan(calibrated[0], str(src), str(out), CFG, telemetry=rec,
                   options=ScanOptions(workers=1, keys=str(inventory)))
    assert (summary["images"], summary["scanned"], summary["failed"]) == (100_000, 4, 99_996)
    assert summary["failed_by_kind"] == {"missing": 99_996} and sorted(rec.images) == wanted
    assert sorted(p.name for p in (out / "records").glob("*.json")) == [n[:-4] + ".json" for n in wanted]
    errors = (out / "errors.jsonl").read_text().splitlines()
    assert len(errors) == 99_996 and json.loads(errors[0])["key"] == "gone/000000.png"
    assert {json.loads(e)["kind"] for e in errors} == {"missing"}
    entries = list(manifest_entries(str(out)))
    assert [e["key"] for e in entries] == [r[1] for r in rows]       # the file's order, every row once


def _settled(folder: Path) -> dict[Path, int]:
    """The records in ``folder`` (with their mtimes) once none has been added for 3 s."""
    seen, since = {}, time.time()
    while time.time() - since < 3:
        now = {p: p.stat().st_mtime_ns for p in folder.glob("**/*.json")}
        if now != seen:
            seen, since = now, time.time()
        time.sleep(0.2)
    return seen


def test_rerun_skips_force_redoes_and_changed_settings_or_inputs_rescan(ray_session, calibrated, dataset,
                                                                        tmp_path):
    src = tmp_path / "src"
    shutil.copytree(Path(dataset, "test", "cut"), src / "line1")
    n = len(list(src.glob("**/*.png")))
    out = str(tmp_path / "out")
    model = calibrated[0]
    first = scan(model, str(src), out, CFG)
    assert first["scanned"] == n and first["skipped"] == 0 and "metrics" not in first
    again = scan(model, str(src), out, CFG)
    assert again["scanned"] == 0 and again["skipped"] == n
    victim = sorted((src / "line1").glob("*.png"))[0]
    time.sleep(0.01)
    shutil.copy(sorted((src / "line1").glob("*.png"))[1], victim)   # new content, same name
    changed = scan(model, str(src), out, CFG)
    assert changed["scanned"] == 1 and changed["skipped"] == n - 1
    assert scan(model, str(src), out, CFG, threshold=read_card(model).threshold * 1.5)["scanned"] == n
    assert scan(model, str(src), out, CFG, options=ScanOptions(force=True))["scanned"] == n


def test_pool_shape_defaults_and_requests_for_what_is_not_up_yet():
    # (workers, GPUs and CPUs per actor, depth, concurrency, computing slots, threads per slot)
    assert _pool_shape(ScanOptions(), {"CPU": 2}) == _Shape(2, 0.0, 1.0, 3, 2, 1, 1)
    assert _pool_shape(ScanOptions(workers=1), {"CPU": 2}) == _Shape(1, 0.0, 2.0, 4, 3, 2, 1)
    assert _pool_shape(ScanOptions(workers=1, concurrency=1), {"CPU": 2}) == _Shape(1, 0.0, 2.0, 2, 1, 1, 2)
    assert _pool_shape(ScanOptions(workers=2, cpus_per_worker=4), {"CPU": 8}) \
        == _Shape(2, 0.0, 4.0, 6, 5, 4, 1)
    assert _pool_shape(ScanOptions(), {"CPU": 16, "GPU": 4}) == _Shape(4, 1.0, 4.0, 3, 2, 1, 4)
    assert _pool_shape(ScanOptions(workers=2, depth=3), {"CPU": 2}) == _Shape(2, 0.0, 1.0, 3, 2, 1, 1)
    assert _pool_shape(ScanOptions(depth=1, concurrency=1), {"CPU": 2}) == _Shape(2, 0.0, 1.0, 1, 1, 1, 1)
    # GPUs not up yet (an autoscaler adds them for the actors' requests): the shape is the request's,
    # one CPU per GPU actor unless asked for more
    assert _pool_shape(ScanOptions(gpus_per_worker=1, workers=2), {"CPU": 2}) \
        == _Shape(2, 1.0, 1.0, 3, 2, 1, 1)
    assert _pool_shape(ScanOptions(gpus_per_worker=1, cpus_per_worker=8), {}) \
        == _Shape(1, 1.0, 8.0, 3, 2, 1, 8)
    assert _pool_shape(ScanOptions(), {"CPU": 0}) == _Shape(1, 0.0, 1.0, 3, 2, 1, 1)   # head with num-cpus 0


def test_one_malloc_arena_only_for_one_thread_cpu_actors(monkeypatch):
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    assert _actor_env(_pool_shape(ScanOptions(), {"CPU": 2})) == {"env_vars": {"MALLOC_ARENA_MAX": "1"}}
    assert _actor_env(_pool_shape(ScanOptions(workers=1), {"CPU": 2})) == {}                  # 2 slots
    assert _actor_env(_pool_shape(ScanOptions(workers=1, concurrency=1), {"CPU": 2})) == {}   # 2 threads
    assert _actor_env(_pool_shape(ScanOptions(), {"CPU": 4, "GPU": 4})) == {}
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert _actor_env(_pool_shape(ScanOptions(), {"CPU": 2})) == {}


def test_pool_fill_spreads_a_short_queue_over_all_actors():
    from collections import deque
    from types import SimpleNamespace

    def actor(name):
        return SimpleNamespace(scan=SimpleNamespace(remote=lambda sample, stem, timeout: (name, stem)))

    pool = object.__new__(_Pool)
    pool.timeout = None
    pool.actors, pool.depth = [actor(i) for i in range(4)], 3
    pool.generation, pool.busy, pool.inflight, pool.started = [0] * 4, [0] * 4, {}, [True] * 4
    queue = deque(SimpleNamespace(sample=None, stem=str(i), attempts=0) for i in range(6))
    pool.fill(queue)
    assert pool.busy == [2, 2, 1, 1] and not queue
    queue.extend(SimpleNamespace(sample=None, stem=str(i), attempts=0) for i in range(6, 20))
    pool.fill(queue)
    assert pool.busy == [3, 3, 3, 3] and len(queue) == 8 and len(pool.inflight) == 12


def test_pool_runs_an_image_that_was_lost_alone_on_an_idle_actor():
    from collections import deque
    from types import SimpleNamespace

    def actor(name):
        return SimpleNamespace(scan=SimpleNamespace(remote=lambda sample, stem, timeout: (name, stem)))

    pool = object.__new__(_Pool)
    pool.timeout = None
    pool.actors, pool.depth = [actor(0), actor(1)], 3
    pool.generation, pool.busy, pool.inflight, pool.started = [0, 0], [1, 0], {}, [True, True]
    lost, lost2 = (SimpleNamespace(sample=None, stem=s, attempts=1) for s in ("lost", "lost2"))
    queue = deque([lost, *(SimpleNamespace(sample=None, stem=s, attempts=0) for s in "abc"), lost2])
    pool.fill(queue)
    assert pool.inflight[(1, "lost")][3] == 3 and pool.busy == [3, 3]     # actor 1 holds it alone
    assert [pool.inflight[k][0] for k in [(0, "a"), (0, "b")]] == [0, 0]
    assert [i.stem for i in queue] == ["c", "lost2"]                      # no actor has room
    pool.busy = [1, 3]
    pool.fill(queue)
    assert [i.stem for i in queue] == ["lost2"] and pool.busy == [2, 3]   # it waits for an idle actor


def test_actors_that_cannot_start_in_time_are_given_up_or_the_scan_gives_up(ray_session):
    """One of two actors asks for a resource no node has: after the wait the pool goes on with the
    other and says so; when no actor can start, one ResourcesUnavailable line says what was asked
    and what the cluster offers."""
    import ray

    class _Tiny:          # defined here, so that Ray ships it by value to its workers
        def pid(self):
            return os.getpid()

    from ray_inspect.distributed.cluster import ResourcesUnavailable
    from ray_inspect.distributed.scan import _await_actors

    shape = _Shape(2, 0.0, 1.0, 3, 2, 1, 1)
    pool = _Pool(ray.remote(_Tiny).options(num_cpus=0), (), 1, 3)
    pool.actors.append(ray.remote(_Tiny).options(num_cpus=0, resources={"no-such-node": 1}).remote())
    pool.generation, pool.busy = [0, 0], [0, 0]
    pool.started.append(pool.actors[1].pid.remote())
    said = []
    _await_actors(pool, shape, 3, said.append)
    assert len(pool.actors) == 1 and ray.get(pool.actors[0].pid.remote()) > 0
    assert said[-1] == "1 of 2 scan actor(s) of {CPU: 1} could not start within 3 s; scanning with 1"
    stuck = _Pool(ray.remote(_Tiny).options(num_cpus=0, resources={"no-such-node": 1}), (), 2, 3)
    with pytest.raises(ResourcesUnavailable) as exc:
        _await_actors(stuck, shape, 2, said.append)
    assert str(exc.value) == ("asked for 2 scan actor(s) of {CPU: 1}; after 2 s none could start: the "
                              "cluster offers {CPU: 2} (--wait-for-resources)")

