"""Data-parallel training on Ray Train (V2 API): the epoch loop of ``steps.training`` in every worker.

Each worker streams its own shard of the Zarr patches, DDP averages the gradients (gloo on CPU,
NCCL on GPU), rank 0 checkpoints model, optimizer, epoch and RNG state every K epochs to the run
storage, and a rerun with the same run name resumes from the last checkpoint. The final model is
written as the usual model directory (weights first, card last).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import queue
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from ray_inspect.config import DEVICE_ENV, ModelConfig, RunConfig, TrainConfig, from_dict
from ray_inspect.core.model import build_model
from ray_inspect.distributed.cluster import ResourcesUnavailable, ensure_ray, offer
from ray_inspect.io import storage
from ray_inspect.io.artifact import ModelCard, load_alexnet, save_model
from ray_inspect.io.patches import open_patches
from ray_inspect.steps.training import PatchBatches, build, check_layout, make_card, set_lr, train_epoch
from ray_inspect.telemetry import NULL_TRAIN, TrainRecorder

STATE = "state.pt"
log = logging.getLogger(__name__)
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"

EpochCallback = Callable[[dict], None]


@dataclass(frozen=True)
class TrainHooks:
    """What watches a training run from the driver.

    ``on_epoch`` gets rank 0's statistics of every finished epoch (epoch, loss, patches, seconds,
    patches_per_s, workers, resumed_from, ranks_in_sync, param_digest, and checkpoint_seconds when it
    checkpointed); if it raises, training goes on and ``fit`` raises that exception at the end.
    ``on_step`` gets rank 0's progress inside an epoch every few seconds: epoch, patches (all
    ranks), of (patches per epoch), loss (mean so far).
    ``telemetry`` records the run for Prometheus (start, every epoch, outcome; failures count too).
    """

    on_epoch: EpochCallback | None = None
    telemetry: TrainRecorder | None = None
    on_step: EpochCallback | None = None


STEP_SECONDS = 2.0   # how often rank 0 reports progress inside an epoch (when someone listens)


def default_run_name(patches_url: str, model_url: str, model_cfg: ModelConfig, train_cfg: TrainConfig,
                     fingerprint: str | None = None) -> str:
    """Same inputs (including the patches' content fingerprint), same run: a rerun resumes."""
    key = json.dumps([patches_url, fingerprint, model_url, asdict(model_cfg), asdict(train_cfg)],
                     sort_keys=True)
    return f"{model_cfg.loss}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _storage_fs(url: str):
    """(storage_path, pyarrow filesystem) for Ray Train; S3 gets the configured endpoint and the
    storage retry policy's attempts and timeouts, credentials come from the workers' environment
    (never from the command line or a config)."""
    if storage.is_local(url):
        return os.path.abspath(storage.local_path(url)), None
    import pyarrow.fs as pafs

    endpoint = storage.s3_endpoint()         # pyarrow reads no endpoint variable of its own
    policy = storage.RETRY
    client = {"retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=policy.attempts),
              "connect_timeout": policy.connect_timeout, "request_timeout": policy.read_timeout}
    if endpoint:
        region = os.environ.get("AWS_DEFAULT_REGION", "us-east-1")
        fs = pafs.S3FileSystem(endpoint_override=endpoint, region=region, **client)
    else:
        fs = pafs.S3FileSystem(**client)
    return url.split("://", 1)[1].rstrip("/"), fs


# --------------------------------------------------------------------------------------------
# In every Ray Train worker
# --------------------------------------------------------------------------------------------

def train_loop(config: dict) -> None:
    """Runs in every Ray Train worker."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    model_cfg = from_dict(ModelConfig, config["model"])
    train_cfg = from_dict(TrainConfig, config["train"])
    device = torch.device("cpu") if _cpu_forced() else ray.train.torch.get_device()
    if config.get("cpus"):
        torch.set_num_threads(max(1, round(config["cpus"])))
    model, opt, loss_fn = build(model_cfg, train_cfg, config.get("alexnet_weights"), device)
    start, state = _restore(model)
    ddp = ray.train.torch.prepare_model(model, move_to_device=device)
    if state is not None:
        opt.load_state_dict(state["optimizer"])  # after the move: Adam's state follows the parameters' device
    data = PatchBatches(open_patches(config["patches"]), train_cfg.batch_size, seed=train_cfg.seed, rank=rank,
                        world=world, augment=train_cfg.augment, defects=train_cfg.synthetic_defects)
    every = max(1, int(config["checkpoint_every"]))
    for epoch in range(start, train_cfg.epochs):
        t0 = time.time()
        lr = set_lr(opt, train_cfg, epoch)
        batches = data.epoch(epoch)
        on_batch = _step_reporter(config, epoch, world, len(data)) if rank == 0 else None
        stats = train_epoch(ddp, opt, batches, loss_fn, train_cfg.precision, device, on_batch)
        totals, in_sync, digest = _all_ranks(stats, model, world)
        seconds = time.time() - t0
        metrics = {"epoch": epoch + 1, "loss": float(totals[0] / totals[1]), "patches": int(totals[1]),
                   "seconds": seconds, "patches_per_s": float(totals[1]) / seconds, "workers": world,
                   "resumed_from": start, "ranks_in_sync": in_sync, "param_digest": digest, "lr": lr}
        if (epoch + 1) % every == 0 or epoch + 1 == train_cfg.epochs:   # the last epoch always checkpoints
            metrics = _report_checkpoint(model, opt, epoch, metrics, rank)
        else:
            ray.train.report(metrics)
        if rank == 0 and config.get("progress") is not None:
            config["progress"].put(metrics)


def _step_reporter(config: dict, epoch: int, world: int, n: int):
    """Rank 0's progress inside an epoch, every ``step_seconds`` to the driver (None: nobody listens)."""
    queue_, every = config.get("progress"), config.get("step_seconds")
    if queue_ is None or not every:
        return None
    start = time.monotonic()
    last = [start]

    def report(patches: int, loss: float) -> None:
        now = time.monotonic()
        if now - last[0] >= every:
            last[0] = now
            queue_.put({"kind": "step", "epoch": epoch + 1, "patches": min(n, patches * world), "of": n,
                        "loss": loss, "seconds": now - start})
    return report


def _restore(model: torch.nn.Module) -> tuple[int, dict | None]:
    """Load the run's last checkpoint into ``model`` and the torch RNG; returns (first epoch to run,
    the checkpoint's state or None)."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return 0, None
    with ckpt.as_directory() as d:
        state = torch.load(os.path.join(d, STATE), map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    torch.set_rng_state(state["rng"])
    return int(state["epoch"]) + 1, state


def _all_ranks(stats: dict, model: torch.nn.Module, world: int) -> tuple[torch.Tensor, bool, float]:
    """(loss sum and patch count over all ranks, whether all ranks hold the same parameters, this
    rank's parameter digest)."""
    import torch.distributed as dist

    totals = torch.tensor([stats["loss"] * stats["patches"], stats["patches"]], dtype=torch.float64)
    digest = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
    lo, hi = digest.clone(), digest.clone()
    if world > 1:
        dist.all_reduce(totals)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return totals, bool(lo == hi), float(digest)


def _report_checkpoint(model: torch.nn.Module, opt: torch.optim.Optimizer, epoch: int, metrics: dict,
                       rank: int) -> dict:
    """Report ``metrics`` with a checkpoint that rank 0 writes; returns them with the seconds it took
    to write and persist it (for telemetry)."""
    import ray.train

    t0 = time.time()
    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if rank == 0:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
                        "rng": torch.get_rng_state(), "metrics": metrics}, os.path.join(d, STATE))
            checkpoint = ray.train.Checkpoint.from_directory(d)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"epoch-{epoch + 1:05d}")
    return {**metrics, "checkpoint_seconds": time.time() - t0}


# --------------------------------------------------------------------------------------------
# In the driver
# --------------------------------------------------------------------------------------------

def fit(patches_url: str, model_url: str, model_cfg: ModelConfig, train_cfg: TrainConfig = TrainConfig(),
        run: RunConfig = RunConfig(), alexnet_weights: str | None = None,
        hooks: TrainHooks | None = None) -> ModelCard:
    """Train on Ray Train (a local Ray when no cluster is given) and write the model directory.

    ``hooks``: the epoch callback and the telemetry recorder (see ``TrainHooks``).
    """
    hooks = hooks or TrainHooks()
    tel = hooks.telemetry or NULL_TRAIN
    on_epoch = hooks.on_epoch
    tel.start({"loss": model_cfg.loss, "latent": model_cfg.latent, "channels": model_cfg.channels,
               "precision": train_cfg.precision, "batch_size": train_cfg.batch_size,
               "epochs": train_cfg.epochs, "workers": run.workers, "run_name": run.run_name or ""})
    if tel.enabled:
        on_epoch = _tee(tel.epoch, on_epoch)   # the recorder first: a failing callback does not blind it
    if hooks.on_step is not None:
        on_epoch = _route(on_epoch, hooks.on_step)
    try:
        card = _fit(patches_url, model_url, model_cfg, train_cfg, run, alexnet_weights, on_epoch,
                    steps=hooks.on_step is not None)
    except BaseException:
        tel.finish({}, ok=False)
        raise
    tel.finish({"run_name": card.training["run_name"], "final_loss": card.training.get("final_loss"),
                "epochs_run": card.training["epochs_run"], "model_fingerprint": card.fingerprint}, ok=True)
    return card


def _route(on_epoch: EpochCallback | None, on_step: EpochCallback) -> EpochCallback:
    """One callback for the queue: progress inside an epoch to ``on_step``, epochs to ``on_epoch``."""
    def route(stats: dict) -> None:
        if stats.get("kind") == "step":
            on_step(stats)
        elif on_epoch is not None:
            on_epoch(stats)
    return route


def _tee(*callbacks: EpochCallback | None) -> EpochCallback:
    calls = [c for c in callbacks if c is not None]

    def both(stats: dict) -> None:
        for c in calls:
            c(stats)
    return both


class _ProgressPump:
    """Hands rank 0's epoch statistics from the workers' queue to ``on_epoch``, in a driver thread
    that runs while the block does and delivers every queued epoch before the block ends.

    An empty poll (``queue.Empty``, which Ray's queue raises too) is the only expected exception.
    ``gone`` are the exceptions of a queue whose actor died (the node it ran on was lost): the pump
    then stops, with a warning. The first exception of ``on_epoch`` is logged when it happens and
    kept in ``error`` (for ``fit`` to raise after training); later epochs are still delivered.
    """

    def __init__(self, progress: Any, on_epoch: EpochCallback, gone: tuple[type[Exception], ...] = ()):
        self.progress, self.on_epoch, self.gone = progress, on_epoch, gone
        self.error: Exception | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ray-inspect-epochs", daemon=True)

    def __enter__(self) -> _ProgressPump:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()   # the queue is drained: every epoch reached on_epoch before fit goes on

    def _run(self) -> None:
        try:
            while not self._stop.is_set() or not self.progress.empty():
                try:
                    stats = self.progress.get(timeout=0.5)
                except queue.Empty:
                    continue
                self._deliver(stats)
        except self.gone as exc:
            log.warning("epoch progress lost with its queue: %s", exc)

    def _deliver(self, stats: dict) -> None:
        try:
            self.on_epoch(stats)
        except Exception as exc:  # noqa: BLE001 - kept, logged once here and raised by fit after training
            if self.error is None:
                self.error = exc
                log.warning("the epoch callback failed at epoch %s (%s: %s); training goes on, the run will "
                            "end with this error", stats.get("epoch"), type(exc).__name__, exc)


def _fit(patches_url: str, model_url: str, model_cfg: ModelConfig, train_cfg: TrainConfig, run: RunConfig,  # noqa: PLR0913 - the inputs, three configs and the progress channel
         alexnet_weights: str | None, on_epoch: EpochCallback | None, steps: bool = False) -> ModelCard:
    from ray.exceptions import RayActorError

    # Ray Train workers run in their own working directory: hand them absolute local paths.
    patches_url = storage.absolute(patches_url)
    alexnet_weights = alexnet_weights and storage.absolute(alexnet_weights)
    attrs = _checked_patches(patches_url, model_cfg, alexnet_weights)
    check_layout(int(attrs["patches"]), run.workers, train_cfg.batch_size)   # one line here, not a gloo abort
    use_gpu, cpus = _placement(run)
    storage_url = run.storage or os.path.join(os.path.expanduser("~"), ".cache", "ray-inspect", "runs")
    name = run.run_name or default_run_name(patches_url, model_url, model_cfg, train_cfg,
                                            attrs.get("fingerprint"))
    pump = _ProgressPump(_driver_queue(), on_epoch, gone=(RayActorError,)) if on_epoch else None
    config = {"model": asdict(model_cfg), "train": asdict(train_cfg), "patches": patches_url,
              "alexnet_weights": alexnet_weights, "checkpoint_every": run.checkpoint_every, "cpus": cpus,
              "progress": pump.progress if pump else None, "step_seconds": STEP_SECONDS if steps else None}
    result = _run(_trainer(config, run, use_gpu, name, storage_url), pump, _asked(run, use_gpu, cpus),
                  run.wait_for_resources)
    with result.checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, STATE), map_location="cpu", weights_only=True)
    model = build_model(model_cfg)
    model.load_state_dict(state["model"])
    card = make_card(model_cfg, train_cfg, patches_url, attrs, [state["metrics"]])
    card = replace(card, training={**card.training, "run_name": name, "storage": storage_url,
                                   "workers": run.workers, "use_gpu": use_gpu,
                                   "epochs_run": int(state["epoch"]) + 1})
    return save_model(model_url, model.eval().to(memory_format=torch.contiguous_format), card)


def _driver_queue() -> Any:
    """The workers' progress queue, on the driver's node and without a CPU: a worker node that is lost
    takes its training workers with it (Ray Train restarts them), never the queue they report to."""
    import ray
    from ray.util.queue import Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    return Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})


def _asked(run: RunConfig, use_gpu: bool, cpus: float) -> str:
    return f"{run.workers} training worker(s) of {offer({'CPU': cpus, 'GPU': 1 if use_gpu else 0})}"


@contextlib.contextmanager
def _worker_start_timeout(seconds: float) -> Iterator[None]:
    """Ray Train's controller waits this long for its worker group's resources, once (it reads the
    variable from the driver's environment when fit() starts it; a value the user set wins). Only
    for the duration of fit(): processes started later do not inherit it."""
    if os.environ.get(START_TIMEOUT_ENV):
        yield
        return
    os.environ[START_TIMEOUT_ENV] = f"{seconds:g}"
    try:
        yield
    finally:
        os.environ.pop(START_TIMEOUT_ENV, None)


def _fit_trainer(trainer: Any, asked: str, wait: float) -> Any:
    """``trainer.fit()``; workers that could not be placed within ``wait`` seconds end as one
    ResourcesUnavailable saying what was asked and what the cluster offers (without a limit on
    controller failures, Ray Train would try again forever)."""
    import ray
    from ray.train.v2.api.exceptions import ControllerError

    try:
        with _worker_start_timeout(wait):
            return trainer.fit()
    except ControllerError as exc:
        if type(exc.controller_failure).__name__ != "WorkerGroupStartupTimeoutError":
            raise
        offered = offer(ray.cluster_resources())
        raise ResourcesUnavailable(f"asked for {asked}; after {wait:g} s they could not start: the cluster "
                                   f"offers {offered} (--wait-for-resources)") from None


def _run(trainer: Any, pump: _ProgressPump | None, asked: str, wait: float) -> Any:
    """``trainer.fit()``'s result, the pump delivering the epochs meanwhile; an error of the epoch
    callback is raised once the training has finished."""
    if pump is None:
        return _fit_trainer(trainer, asked, wait)
    with pump:
        result = _fit_trainer(trainer, asked, wait)
    if pump.error is not None:
        pump.error.add_note("raised by the epoch callback; the training finished and checkpointed, "
                            "so a rerun resumes there and writes the model")
        raise pump.error
    return result


def _checked_patches(patches_url: str, model_cfg: ModelConfig, alexnet_weights: str | None) -> dict:
    """The patches' attributes, once the inputs are known to fit the model (a bad file fails here,
    not in every worker)."""
    if model_cfg.loss == "fm":
        load_alexnet(alexnet_weights or "")
    arr = open_patches(patches_url)
    if arr.shape[1] != model_cfg.channels:
        raise ValueError(f"{patches_url}: patches have {arr.shape[1]} channel(s), "
                         f"the model expects {model_cfg.channels}")
    return dict(arr.attrs)


def _cpu_forced() -> bool:
    """RAY_INSPECT_DEVICE=cpu: compute on CPU where Ray assigned GPUs (fake GPU nodes in tests)."""
    return os.environ.get(DEVICE_ENV, "").lower() == "cpu"


def _placement(run: RunConfig) -> tuple[bool, float]:
    """(GPUs or not, CPUs per worker) on the cluster ``run`` joins or starts. GPUs that are not up
    yet are not an error: the workers ask for them and wait (an autoscaler adds the nodes). A local
    Ray with fewer CPUs than workers shares them (fractions), rather than waiting for CPUs that
    never come; on a cluster each worker asks for at least one, which the autoscaler can add."""
    resources = ensure_ray(run.address)
    gpus = resources.get("GPU", 0)
    use_gpu = gpus >= run.workers if run.use_gpu is None else run.use_gpu
    if run.cpus_per_worker:
        return use_gpu, run.cpus_per_worker
    total = resources.get("CPU", 1)
    if run.address is None and not os.environ.get("RAY_ADDRESS") and total < run.workers:
        # Ray keeps 4 decimals of a resource: round down, or 3 x 0.6667 would not fit in 2 CPUs
        return use_gpu, math.floor(total / run.workers * 1e4) / 1e4
    return use_gpu, max(1, int(total) // run.workers)


def _trainer(config: dict, run: RunConfig, use_gpu: bool, name: str, storage_url: str):
    """The TorchTrainer of ``train_loop`` with ``config``, checkpointing to ``storage_url``/``name``."""
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    storage_path, fs = _storage_fs(storage_url)
    return TorchTrainer(
        train_loop,
        train_loop_config=config,
        torch_config=TorchConfig(backend="gloo") if _cpu_forced() else None,
        scaling_config=ScalingConfig(num_workers=run.workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": config["cpus"]}),
        run_config=RayRunConfig(name=name, storage_path=storage_path, storage_filesystem=fs,
                                failure_config=FailureConfig(max_failures=run.max_failures,
                                                             controller_failure_limit=0),
                                checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
