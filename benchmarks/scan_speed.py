"""Scan speed as ratios within one run (targets: end-to-end >= 0.85 x bare forward; >= 10x naive loop).

1. bare model forward: tiles/s of the network alone on ready-made tiles (same batch, same precision),
   the fastest way on these cores: one single-threaded process per core, run at once;
2. end-to-end ``scan`` on Ray actors (1 actor on 1 CPU, one actor per CPU, 1 actor on all CPUs) of
   a local archive of 1024x1024 PNGs: list, read, tile, model, average, SSIM, threshold, opening, write;
   the steady rate runs, per actor, from its first finished image to its last (actor start-up
   excluded; records carry the worker and the time), the wall rate includes everything;
3. a naive loop: one tile at a time in float32, averaging in Python, skimage's SSIM (on one CPU and
   on all of them, each pool compared with the loop on as many CPUs).
Prints a JSON object; docs/benchmarks.md records the figures with machine and date.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import date

import numpy as np
import torch
from skimage.metrics import structural_similarity

from ray_inspect.config import InspectConfig, ModelConfig, ScanOptions, SynthConfig
from ray_inspect.core.inference import precision_context, prepare_model, tiles_for
from ray_inspect.core.model import ConvAE
from ray_inspect.distributed.cluster import ensure_ray
from ray_inspect.distributed.scan import scan
from ray_inspect.io.artifact import ModelCard, load_model, save_model
from ray_inspect.io.images import read_image
from ray_inspect.io.synth import generate
from ray_inspect.records import ImageRecord
from ray_inspect.steps.calibrate import calibrate


def bare_forward(model, batch: int, precision: str, seconds: float = 8.0) -> float:
    m = prepare_model(model, precision)
    x = torch.rand(batch, 1, 128, 128)
    if precision == "bfloat16":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), precision_context(precision, torch.device("cpu")):
        m(x)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            m(x)
            n += batch
    return n / (time.perf_counter() - t0)


def _bare_worker(url: str, batch: int, precision: str, seconds: float, q) -> None:
    torch.set_num_threads(1)
    q.put(bare_forward(load_model(url), batch, precision, seconds))


def bare_forward_processes(url: str, n: int, batch: int, precision: str, seconds: float = 4.0) -> float:
    """Summed bare forward rate of ``n`` single-threaded processes running at once (the actors' shape)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_bare_worker, args=(url, batch, precision, seconds, q)) for _ in range(n)]
    for p in procs:
        p.start()
    rates = [q.get() for _ in procs]
    for p in procs:
        p.join()
    return sum(rates)


def naive_loop(model, image: np.ndarray, stride: int = 30) -> float:
    """Seconds for one image: per-tile float32 forward, Python averaging, skimage SSIM."""
    t0 = time.perf_counter()
    h, w = image.shape
    acc, cnt = np.zeros((h, w)), np.zeros((h, w))
    ys = list(range(0, h - 127, stride)) + [h - 128]
    xs = list(range(0, w - 127, stride)) + [w - 128]
    with torch.inference_mode():
        for y in sorted(set(ys)):
            for x in sorted(set(xs)):
                t = torch.from_numpy(image[y:y + 128, x:x + 128].copy())[None, None]
                acc[y:y + 128, x:x + 128] += model(t)[0, 0].numpy()
                cnt[y:y + 128, x:x + 128] += 1
    recon = np.clip(acc / cnt, 0, 1)
    _, s = structural_similarity(image.astype(np.float64), recon, data_range=1, gaussian_weights=True,
                                 sigma=1.5, use_sample_covariance=False, full=True)
    _ = (1 - s) > 0.5
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--precision", default="bfloat16")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--depth", type=int, default=None, help="images queued per actor (default: the scan's)")
    ap.add_argument("--model", default=None, help="a trained model directory (default: He-initialised)")
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="ri-bench-")
    generate(os.path.join(work, "data"), SynthConfig(size=1024, train=0, validation=0, test_good=a.images,
                                                     test_defective=0))
    src = os.path.join(work, "data", "test", "good")
    torch.manual_seed(0)
    model = load_model(a.model) if a.model else ConvAE(ModelConfig())
    url = os.path.join(work, "model")
    save_model(url, model, ModelCard(model=ModelConfig(), resize=None))
    cfg = InspectConfig(batch_size=a.batch_size, precision=a.precision)
    # a production-like threshold: pixel FPR 1e-4 on these (defect-free) images
    calibrate(url, src, fpr=1e-4, cfg=cfg)

    cpus = os.cpu_count()
    ensure_ray(num_cpus=cpus)
    tiles = tiles_for(1024, 1024)

    def run_scan(out: str, workers: int, cpus_per_worker: int) -> dict:
        """Steady rate: per actor, images after its first over the time from its first record to
        its last (actor start-up, model loading and the listing excluded); summed over actors."""
        t0 = time.perf_counter()
        options = ScanOptions(workers=workers, cpus_per_worker=cpus_per_worker, depth=a.depth, force=True)
        summary = scan(url, src, out, cfg, options=options)
        wall = time.perf_counter() - t0
        done: dict[str, list[float]] = {}
        for name in os.listdir(os.path.join(out, "records")):
            with open(os.path.join(out, "records", name)) as f:
                rec = ImageRecord.from_json(f.read())
            done.setdefault(rec.worker, []).append(rec.finished)
        rate = sum((len(t) - 1) / (max(t) - min(t)) for t in done.values() if len(t) > 1)
        return {"images": summary["scanned"], "actors": len(done), "cpus_per_actor": cpus_per_worker,
                "compute_slots": summary["compute_slots"], "wall_s": round(wall, 3),
                "tiles_per_s": round(rate * tiles, 1),
                "megapixels_per_s": round(rate * 1024 * 1024 / 1e6, 3),
                "wall_tiles_per_s": round(summary["scanned"] * tiles / wall, 1)}

    run_scan(os.path.join(work, "warm"), 1, 1)            # warm-up (page cache, allocator, Ray workers)
    # Pools: 1 actor on 1 CPU, one actor per CPU (the default), 1 actor on all CPUs. The reference of
    # each is the fastest bare forward on its CPUs: one single-threaded process per CPU at once (one
    # process with a thread per CPU is ~10 % slower; reported for information). The machine's speed
    # drifts over seconds, so every scan is bracketed by reference runs (the mean of the one before
    # and the one after) and each round gives a ratio per pool; the median round is reported.
    pools = {"1_actor_1_cpu": (1, 1), f"{cpus}_actors_1_cpu": (cpus, 1), f"1_actor_{cpus}_cpus": (1, cpus)}
    rounds = []
    for r in range(a.rounds):
        torch.set_num_threads(cpus)
        threaded = bare_forward(load_model(url), a.batch_size, a.precision, seconds=4.0)
        rnd = {"bare_1_process_threaded": threaded}
        refs: dict[int, float] = {}
        for name, (workers, per) in pools.items():
            n = workers * per
            before = refs.get(n) or bare_forward_processes(url, n, a.batch_size, a.precision)
            res = run_scan(os.path.join(work, f"{name}-{r}"), workers, per)
            refs[n] = bare_forward_processes(url, n, a.batch_size, a.precision)
            res["bare_tiles_per_s"] = round((before + refs[n]) / 2, 1)
            res["ratio"] = round(res["tiles_per_s"] / res["bare_tiles_per_s"], 3)
            rnd[name] = res
        rnd[f"1_actor_{cpus}_cpus"]["ratio_to_threaded_bare"] = round(
            rnd[f"1_actor_{cpus}_cpus"]["tiles_per_s"] / rnd["bare_1_process_threaded"], 3)
        rounds.append(rnd)
        print(json.dumps({k: v["ratio"] for k, v in rnd.items() if isinstance(v, dict)}), file=sys.stderr,
              flush=True)

    def median_round(name):
        return sorted(rounds, key=lambda d: d[name]["ratio"])[len(rounds) // 2][name]

    img = read_image(os.path.join(src, "000.png"))
    naive_s = {}                                          # on one CPU and on all of them
    for n in (1, cpus):
        torch.set_num_threads(n)
        naive_s[n] = naive_loop(load_model(url).eval(), img)
    result = {
        "date": date.today().isoformat(), "machine": f"{platform.processor() or platform.machine()}, "
        f"{cpus} cores, torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()})",
        "batch_size": a.batch_size, "precision": a.precision, "depth": a.depth, "image": "1024x1024",
        "images": a.images,
        "tiles_per_image": tiles, "rounds": a.rounds,
        "pools": {name: {**median_round(name), "round_ratios": [d[name]["ratio"] for d in rounds]}
                  for name in pools},
        "bare_1_process_threaded_tiles_per_s": [round(d["bare_1_process_threaded"], 1) for d in rounds],
        "naive_seconds_per_image": {f"{n}_threads": round(v, 2) for n, v in naive_s.items()},
        "speedup_vs_naive_on_the_same_cpus": {
            name: round(naive_s[w * per] * median_round(name)["tiles_per_s"] / tiles, 1)
            for name, (w, per) in pools.items()},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
