"""The scan driver's cost as the archive grows: memory, first dispatch, and a rerun's requests.

For each size N (default 10,000, 100,000 and 1,000,000) a source of N tiny objects is made once,
in a local folder or, with --s3, on a SeaweedFS started here. Then, each in a fresh process: a first
scan into an empty OUT and a rerun of the finished scan. The actors are replaced by a stand-in that
completes each image at once, so what is measured is the driver alone — listing, output names,
tally, ledger, manifest, lease — at a size no real fleet could scan here. Reported per run: the
driver's peak RSS above its RSS before the listing, per listed object; seconds from the start to
the first image handed out; wall seconds; requests to storage by kind (listing pages, reads,
writes, checks). Prints JSON lines; docs/benchmarks.md records the figures with machine and date.

Usage: python benchmarks/archive_scale.py [--sizes 10000 100000 1000000] [--s3] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date


def make_source(root: str, n: int, s3=None) -> str:
    """N one-byte objects below ROOT, 1,000 per folder (as a camera archive is laid out)."""
    keys = [f"line{i // 100_000}/batch{(i // 1000) % 100:03d}/{i:07d}.png" for i in range(n)]
    if s3 is None:
        marker = os.path.join(root, ".complete")
        if not os.path.exists(marker):
            for k in keys:
                path = os.path.join(root, k)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as f:
                    f.write(b"x")
            open(marker, "w").close()
        return root
    client, bucket, prefix = s3
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda k: client.put_object(Bucket=bucket, Key=f"{prefix}/{k}", Body=b"x"), keys))
    return f"s3://{bucket}/{prefix}"


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(source: str, out: str) -> dict:
    """One scan of SOURCE into OUT by the real driver, with an instant stand-in for the actors."""
    from ray_inspect.config import InspectConfig, MetricsConfig, ModelConfig, ScanOptions
    from ray_inspect.distributed import scan as driver
    from ray_inspect.io import storage
    from ray_inspect.io.artifact import ModelCard
    from ray_inspect.io.lease import Lease
    from ray_inspect.records import ImageRecord, Outcome

    card = ModelCard(model=ModelConfig(), resize=None)
    plan = driver.ScanPlan("bench-model", source, out, card, InspectConfig(), 0.5, MetricsConfig(), "bench")
    options = ScanOptions(workers=2)
    shape = driver._pool_shape(options, {"CPU": 2})
    before, rss0, t0 = storage.requests(), _maxrss(), time.perf_counter()
    with Lease(out, options.lease_stale) as lease:
        run = driver._Run.create(plan, options, {}, time.time())
        run.lease = lease
        listing = driver._Window(driver._source(run), max(driver.WINDOW, 4 * shape.workers * shape.depth))
        first = None
        while True:
            listing.top_up()
            if not listing.queue:
                break
            item = listing.queue.popleft()
            first = first if first is not None else time.perf_counter() - t0
            record = ImageRecord(key=item.sample.key, stem=item.stem, url=item.sample.url,
                                 version=item.sample.version, status=Outcome.OK, fingerprint="bench",
                                 defect_type=None, mask_url=None, score=0.0, height=1, width=1, tiles=1,
                                 bands=1, threshold=0.5, bytes_read=1, max_rss_bytes=0)
            driver._scanned(run, item, driver.ScanResult(Outcome.OK, record))
        summary = driver._finalise(run, shape, shape.workers)
    after = storage.requests()
    requests = {k: after.get(k, 0) - before.get(k, 0) for k in sorted(set(after) | set(before))}
    return {"images": summary["images"], "scanned": summary["scanned"], "skipped": summary["skipped"],
            "wall_s": round(time.perf_counter() - t0, 2),
            "first_dispatch_s": None if first is None else round(first, 3),
            "rss_growth_bytes": _maxrss() - rss0, "requests": requests,
            "ledger_objects": run.ledger.objects}


def _run_child(source: str, out: str, env: dict) -> dict:
    cmd = [sys.executable, __file__, "--child", source, out]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--s3", action="store_true", help="the source and OUT on a SeaweedFS started here")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "ray-inspect-archive-scale"))
    ap.add_argument("--child", nargs=2, metavar=("SOURCE", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(*a.child)))
        return
    os.makedirs(a.work, exist_ok=True)
    if a.s3:
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
        from helpers.s3server import _client, s3_server

        with s3_server(directory=os.path.join(a.work, "weed")) as server:
            client = _client(server.endpoint, server.access_key, server.secret_key)
            env = {**os.environ, **server.env()}
            for n in a.sizes:
                tag = f"n{n}-{int(time.time())}"
                source = make_source("", n, (client, server.bucket, f"src-{tag}"))
                _report(n, "s3", source, f"s3://{server.bucket}/out-{tag}", env)
        return
    for n in a.sizes:
        source = make_source(os.path.join(a.work, f"src-{n}"), n)
        out = os.path.join(a.work, f"out-{n}-{int(time.time())}")
        _report(n, "local", source, out, dict(os.environ))


def _report(n: int, where: str, source: str, out: str, env: dict) -> None:
    for run in ("first", "rerun"):
        res = _run_child(source, out, env)
        line = {"objects": n, "storage": where, "run": run, **res,
                "rss_bytes_per_object": round(res["rss_growth_bytes"] / n, 1),
                "date": date.today().isoformat(), "machine": f"{platform.processor() or 'x86-64'}, "
                                                              f"{os.cpu_count()} CPUs"}
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
