"""Data-parallel training on Ray Train (V2 API): the epoch loop of ``train.py`` in every worker.

Each worker streams its own shard of the Zarr patches, DDP averages the gradients (gloo on CPU,
NCCL on GPU), rank 0 checkpoints model, optimizer, epoch and RNG state every K epochs to the run
storage, and a rerun with the same run name resumes from the last checkpoint. The final model is
written as the usual model directory (weights first, card last).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import time
from dataclasses import asdict, replace
from typing import Callable

import torch

from ray_inspect.config import ModelConfig, RunConfig, TrainConfig, from_dict
from ray_inspect.core.model import build_model
from ray_inspect.distributed.cluster import ensure_ray
from ray_inspect.io import storage
from ray_inspect.io.artifact import ModelCard, load_alexnet, save_model
from ray_inspect.io.patches import open_patches
from ray_inspect.steps.training import PatchBatches, build, make_card, train_epoch
from ray_inspect.telemetry import TrainTelemetry

STATE = "state.pt"


def default_run_name(patches_url: str, model_url: str, model_cfg: ModelConfig, train_cfg: TrainConfig,
                     fingerprint: str | None = None) -> str:
    """Same inputs (including the patches' content fingerprint), same run: a rerun resumes."""
    key = json.dumps([patches_url, fingerprint, model_url, asdict(model_cfg), asdict(train_cfg)], sort_keys=True)
    return f"{model_cfg.loss}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _storage_fs(url: str):
    """(storage_path, pyarrow filesystem) for Ray Train; S3 gets the configured endpoint, credentials
    come from the workers' environment (never from the command line or a config)."""
    if storage.is_local(url):
        return os.path.abspath(storage.local_path(url)), None
    import pyarrow.fs as pafs

    endpoint = os.environ.get(storage.ENDPOINT_ENV)
    fs = pafs.S3FileSystem(endpoint_override=endpoint, region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
                           retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=5)) if endpoint else \
        pafs.S3FileSystem(retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=5))
    return url.split("://", 1)[1].rstrip("/"), fs


def _steps_per_epoch(batches: PatchBatches, epoch: int) -> int:
    """Batches every rank runs this epoch: DDP needs the same count on all ranks."""
    n = batches.array.shape[0]
    counts = []
    for r in range(batches.world):
        chunks = PatchBatches(batches.array, batches.batch_size, batches.seed, r, batches.world).chunks_for(epoch)
        counts.append(sum(min(batches.chunk, n - c * batches.chunk) for c in chunks))
    return max(1, -(-min(counts) // batches.batch_size))


def _limited(it, steps: int):
    for i, x in enumerate(it):
        if i >= steps:
            break
        yield x


def train_loop(config: dict) -> None:
    """Runs in every Ray Train worker."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    model_cfg = from_dict(ModelConfig, config["model"])
    train_cfg = from_dict(TrainConfig, config["train"])
    device = ray.train.torch.get_device()
    if config.get("threads"):
        torch.set_num_threads(config["threads"])
    model, opt, loss_fn = build(model_cfg, train_cfg, config.get("alexnet_weights"), device)
    start, state = 0, None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(os.path.join(d, STATE), map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        torch.set_rng_state(state["rng"])
        start = int(state["epoch"]) + 1
    ddp = ray.train.torch.prepare_model(model)
    if state is not None:
        opt.load_state_dict(state["optimizer"])  # after the move: Adam's state follows the parameters' device
    data = PatchBatches(open_patches(config["patches"]), train_cfg.batch_size, seed=train_cfg.seed, rank=rank,
                        world=world)
    every = max(1, int(config["checkpoint_every"]))
    for epoch in range(start, train_cfg.epochs):
        t0 = time.time()
        steps = _steps_per_epoch(data, epoch)
        stats = train_epoch(ddp, opt, _limited(data.epoch(epoch), steps), loss_fn, train_cfg.precision, device)
        totals = torch.tensor([stats["loss"] * stats["patches"], stats["patches"]], dtype=torch.float64)
        digest = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
        lo, hi = digest.clone(), digest.clone()
        if world > 1:
            dist.all_reduce(totals)
            dist.all_reduce(lo, op=dist.ReduceOp.MIN)
            dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        seconds = time.time() - t0
        metrics = {"epoch": epoch + 1, "loss": float(totals[0] / totals[1]), "patches": int(totals[1]),
                   "seconds": seconds, "patches_per_s": float(totals[1]) / seconds, "workers": world,
                   "resumed_from": start, "ranks_in_sync": bool(lo == hi), "param_digest": float(digest)}
        last = epoch + 1 == train_cfg.epochs
        if (epoch + 1) % every == 0 or last:
            t_ckpt = time.time()
            with tempfile.TemporaryDirectory() as d:
                checkpoint = None
                if rank == 0:
                    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
                                "rng": torch.get_rng_state(), "metrics": metrics}, os.path.join(d, STATE))
                    checkpoint = ray.train.Checkpoint.from_directory(d)
                ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"epoch-{epoch + 1:05d}")
            metrics = {**metrics, "checkpoint_seconds": time.time() - t_ckpt}   # write and persist, for telemetry
        else:
            ray.train.report(metrics)
        if rank == 0 and config.get("progress") is not None:
            config["progress"].put(metrics)


def fit(patches_url: str, model_url: str, model_cfg: ModelConfig, train_cfg: TrainConfig = TrainConfig(),
        run: RunConfig = RunConfig(), alexnet_weights: str | None = None,
        on_epoch: Callable[[dict], None] | None = None, telemetry: TrainTelemetry | None = None) -> ModelCard:
    """Train on Ray Train (a local Ray when no cluster is given) and write the model directory.

    ``telemetry`` records the run for Prometheus (start, every epoch, outcome); failures count too.
    """
    tel = telemetry or TrainTelemetry.disabled()
    tel.start({"loss": model_cfg.loss, "latent": model_cfg.latent, "channels": model_cfg.channels,
               "precision": train_cfg.precision, "batch_size": train_cfg.batch_size, "epochs": train_cfg.epochs,
               "workers": run.workers, "run_name": run.run_name or ""})
    if tel.enabled:
        on_epoch = _tee(on_epoch, tel.epoch)
    try:
        card = _fit(patches_url, model_url, model_cfg, train_cfg, run, alexnet_weights, on_epoch)
    except BaseException:
        tel.finish({}, ok=False)
        raise
    tel.finish({"run_name": card.training["run_name"], "final_loss": card.training.get("final_loss"),
                "epochs_run": card.training["epochs_run"], "model_fingerprint": card.fingerprint}, ok=True)
    return card


def _tee(*callbacks: Callable[[dict], None] | None) -> Callable[[dict], None]:
    calls = [c for c in callbacks if c is not None]

    def both(stats: dict) -> None:
        for c in calls:
            c(stats)
    return both


def _fit(patches_url: str, model_url: str, model_cfg: ModelConfig, train_cfg: TrainConfig, run: RunConfig,
         alexnet_weights: str | None, on_epoch: Callable[[dict], None] | None) -> ModelCard:
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    # Ray Train workers run in their own working directory: hand them absolute local paths.
    patches_url, alexnet_weights = storage.absolute(patches_url), alexnet_weights and storage.absolute(alexnet_weights)
    if model_cfg.loss == "fm":
        load_alexnet(alexnet_weights or "")  # a bad weights file fails here, not in every worker
    arr = open_patches(patches_url)
    if arr.shape[1] != model_cfg.channels:
        raise ValueError(f"{patches_url}: patches have {arr.shape[1]} channel(s), the model expects {model_cfg.channels}")
    attrs = dict(arr.attrs)
    resources = ensure_ray(run.address)
    gpus = resources.get("GPU", 0)
    use_gpu = gpus >= run.workers if run.use_gpu is None else run.use_gpu
    if use_gpu and gpus < run.workers:
        raise ValueError(f"--use-gpu asks for {run.workers} GPU worker(s), the cluster has {int(gpus)} GPU(s)")
    cpus = run.cpus_per_worker or max(1, int(resources.get("CPU", 1)) // run.workers)
    storage_url = run.storage or os.path.join(os.path.expanduser("~"), ".cache", "ray-inspect", "runs")
    storage_path, fs = _storage_fs(storage_url)
    name = run.run_name or default_run_name(patches_url, model_url, model_cfg, train_cfg, attrs.get("fingerprint"))
    progress = Queue() if on_epoch else None
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"model": asdict(model_cfg), "train": asdict(train_cfg), "patches": patches_url,
                           "alexnet_weights": alexnet_weights, "checkpoint_every": run.checkpoint_every,
                           "threads": cpus, "progress": progress},
        scaling_config=ScalingConfig(num_workers=run.workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus}),
        run_config=RayRunConfig(name=name, storage_path=storage_path, storage_filesystem=fs,
                                failure_config=FailureConfig(max_failures=run.max_failures),
                                checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    stop = threading.Event()
    if progress is not None:
        def pump():
            while not stop.is_set() or not progress.empty():
                try:
                    on_epoch(progress.get(timeout=0.5))
                except Exception:  # noqa: BLE001 - queue.Empty and shutdown races
                    continue
        pumper = threading.Thread(target=pump, daemon=True)
        pumper.start()
    try:
        result = trainer.fit()
    finally:
        stop.set()
        if progress is not None:
            pumper.join(timeout=5)
    with result.checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, STATE), map_location="cpu", weights_only=True)
    model = build_model(model_cfg)
    model.load_state_dict(state["model"])
    history = [state["metrics"]]
    card = make_card(model_cfg, train_cfg, patches_url, attrs, history)
    card = replace(card, training={**card.training, "run_name": name, "storage": storage_url,
                                   "workers": run.workers, "use_gpu": use_gpu, "epochs_run": int(state["epoch"]) + 1})
    return save_model(model_url, model.eval().to(memory_format=torch.contiguous_format), card)
