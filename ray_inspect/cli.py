"""The ``ray-inspect`` command line: a thin click layer over the library."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import warnings

import click

from ray_inspect.config import (
    AUGMENTATIONS,
    LOSSES,
    LR_SCHEDULES,
    NORMALISERS,
    PRECISIONS,
    InspectConfig,
    ModelConfig,
    PrepareConfig,
    RunConfig,
    ScanOptions,
    ScoreConfig,
    SynthConfig,
    TrainConfig,
)
from ray_inspect.io.storage import ENDPOINT_ENV

ERRORS_SHOWN = 20       # images not scanned that the terminal names (errors.jsonl lists all)


class OneLineErrors(click.Group):
    """Expected failures (bad files, bad URLs, bad settings) end as one line, not a traceback."""

    def invoke(self, ctx):
        from ray_inspect.io.lease import LeaseHeld
        from ray_inspect.io.storage import StorageError
        from ray_inspect.records import InputError

        try:
            return super().invoke(ctx)
        except (InputError, StorageError, FileNotFoundError, ValueError, TimeoutError, LeaseHeld) as exc:
            click.echo(f"ray-inspect: error: {exc}", err=True)
            sys.exit(2)
        except Exception as exc:
            cause = _training_failure(exc)
            if cause is None:
                raise
            click.echo(f"ray-inspect: error: training failed after its retries ({cause[:300]}); "
                       "rerun the same command to resume from the last checkpoint", err=True)
            sys.exit(2)


def _training_failure(exc: BaseException) -> str | None:
    """The cause of a Ray Train failure in one line (the lowest failed worker's exception), or None
    when ``exc`` is not one."""
    if "ray.train" not in sys.modules:   # training was never started in this process
        return None
    from ray.train import TrainingFailedError
    from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

    if not isinstance(exc, TrainingFailedError):
        return None
    if isinstance(exc, WorkerGroupError) and exc.worker_failures:
        cause = exc.worker_failures[min(exc.worker_failures)]
    elif isinstance(exc, ControllerError):
        cause = exc.controller_failure
    else:
        cause = exc.__cause__ or exc
    lines = [ln.strip() for ln in str(cause).splitlines() if ln.strip()]
    return f"{type(cause).__name__}: {lines[0]}" if lines else type(cause).__name__


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: PLR0913 - warnings.showwarning's signature
    """Python warnings as one log record of ours (``ray-inspect: warning: ...`` or JSON), not two
    lines of source location."""
    import logging

    logging.getLogger("ray_inspect").warning("%s", message)


def _emit(data: dict, as_json: bool, text: str) -> None:
    click.echo(json.dumps(data, indent=2, default=str) if as_json else text)


@click.group(cls=OneLineErrors)
@click.version_option(package_name="ray-inspect")
@click.option("--s3-endpoint", envvar="RAY_INSPECT_S3_ENDPOINT", default=None, metavar="URL",
              help="Endpoint of an S3-compatible store (also RAY_INSPECT_S3_ENDPOINT); credentials come from "
                   "the AWS environment variables or profile, never from options.")
@click.option("--metrics-port", envvar="RAY_INSPECT_METRICS_PORT", default=0, show_default=True,
              type=click.IntRange(0, 65535),
              help="Serve Prometheus metrics of scan/train on this port (0: off).")
@click.option("--metrics-bind", envvar="RAY_INSPECT_METRICS_BIND", default="127.0.0.1", show_default=True,
              help="Address the metrics port binds (0.0.0.0 in a pod, so Prometheus can scrape it).")
@click.option("--pushgateway", envvar="RAY_INSPECT_PUSHGATEWAY", default=None, metavar="URL",
              help="Push the outcome of a finished scan/train run to this Prometheus Pushgateway.")
@click.option("--log-format", envvar="RAY_INSPECT_LOG_FORMAT", type=click.Choice(["text", "json"]),
              default="text", show_default=True,
              help="json: one JSON object per log line, with run id and image key.")
@click.option("--verbose", "-v", is_flag=True, envvar="RAY_INSPECT_VERBOSE",
              help="Also show Ray's own log lines (workers, controller, checkpoints).")
@click.pass_context
def main(ctx: click.Context, s3_endpoint: str | None, metrics_port: int, metrics_bind: str,  # noqa: PLR0913 - one argument per click option
         pushgateway: str | None, log_format: str, verbose: bool) -> None:
    """Unsupervised defect segmentation of industrial images (SSIM autoencoder, Bergmann et al. 2019)."""
    from ray_inspect.telemetry import configure

    warnings.showwarning = _warning_line
    if verbose:   # Ray is imported only by the commands that use it; quiet is its default here
        from ray_inspect.distributed.cluster import set_verbose

        set_verbose(True)
    if s3_endpoint:
        os.environ[ENDPOINT_ENV] = s3_endpoint  # read by storage and passed on to Ray workers
    ctx.ensure_object(dict)["telemetry"] = configure(metrics_port, metrics_bind, pushgateway, log_format)


@main.command()
@click.argument("out")
@click.option("--texture", default=("plain",), multiple=True, show_default=True,
              help="Texture(s) to generate; one MVTec-layout root per texture under OUT.")
@click.option("--train", "n_train", default=SynthConfig.train, show_default=True,
              help="Defect-free training images.")
@click.option("--test", "n_test", default=SynthConfig.test_defective, show_default=True,
              help="Defective test images.")
@click.option("--good", "n_good", default=SynthConfig.test_good, show_default=True,
              help="Defect-free test images.")
@click.option("--validation", "n_val", default=SynthConfig.validation, show_default=True,
              help="Defect-free validation images (for calibrate).")
@click.option("--size", default=SynthConfig.size, show_default=True, help="Image side in pixels.")
@click.option("--seed", default=SynthConfig.seed, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def synth(out, texture, n_train, n_test, n_good, n_val, size, seed, as_json):  # noqa: PLR0913 - one argument per click option
    """Write a deterministic synthetic woven-fabric data set (MVTec AD layout) under OUT/<texture>."""
    from ray_inspect.io import storage
    from ray_inspect.io.synth import generate

    results = []
    for tex in texture:
        cfg = SynthConfig(texture=tex, size=size, train=n_train, test_defective=n_test, test_good=n_good,
                          validation=n_val, seed=seed)
        total = n_train + n_test + n_good + n_val
        with click.progressbar(length=total, label=f"synth {tex}", file=sys.stderr) as bar:
            results.append(generate(storage.join(out, tex), cfg, progress=lambda *_: bar.update(1)))
    _emit({"datasets": results}, as_json, "\n".join(f"{r['out']}: {r['counts']}" for r in results))


@main.command()
@click.argument("dataset")
@click.argument("patches")
@click.option("--patches", "n", default=PrepareConfig.patches, show_default=True, help="Number of patches.")
@click.option("--short-side", default="256", show_default=True,
              help="Scale the images so that their smallest shorter side is PX (aspect ratio kept; never "
                   "enlarged), or 'none' to keep the original resolution.")
@click.option("--scale", type=float, default=None,
              help="Scale every image by this factor instead (e.g. 0.5); see docs/method.md on choosing it.")
@click.option("--channels", default=1, type=click.Choice(["1", "3"]), show_default=True)
@click.option("--chunk", default=PrepareConfig.chunk, show_default=True, help="Patches per Zarr chunk.")
@click.option("--seed", default=PrepareConfig.seed, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def prepare(dataset, patches, n, short_side, scale, channels, chunk, seed, as_json):  # noqa: PLR0913 - one argument per click option
    """Crop random 128x128 training patches of DATASET into a Zarr v3 array at PATCHES."""
    from ray_inspect.io.patches import prepare as run
    from ray_inspect.io.patches import scale_reason

    side = None if short_side.lower() == "none" else int(short_side)
    cfg = PrepareConfig(patches=n, short_side=side, scale=scale, channels=int(channels), chunk=chunk,
                        seed=seed)
    with contextlib.ExitStack() as stack:
        bar = []        # opened with the first patch: an input refused before it stays a one-line error

        def progress(k: int) -> None:
            if not bar:
                bar.append(stack.enter_context(click.progressbar(length=n, label="patches", file=sys.stderr)))
            bar[0].update(k)

        attrs = run(dataset, patches, cfg, progress=progress)
    _emit(attrs, as_json,
          f"{patches}: {n} patches from {attrs['images']} images, fingerprint {attrs['fingerprint']}\n"
          f"{scale_reason(attrs, cfg)}")


@main.command()
@click.argument("patches")
@click.argument("model")
@click.option("--loss", type=click.Choice(LOSSES), default=ModelConfig.loss, show_default=True)
@click.option("--latent", default=ModelConfig.latent, show_default=True, help="Latent size d.")
@click.option("--epochs", default=TrainConfig.epochs, show_default=True)
@click.option("--batch-size", default=TrainConfig.batch_size, show_default=True, help="Per worker.")
@click.option("--lr", default=TrainConfig.lr, show_default=True)
@click.option("--weight-decay", default=TrainConfig.weight_decay, show_default=True)
@click.option("--precision", type=click.Choice(PRECISIONS), default=TrainConfig.precision, show_default=True)
@click.option("--lr-schedule", type=click.Choice(LR_SCHEDULES), default=TrainConfig.lr_schedule,
              show_default=True, help="constant (the paper) or cosine decay to lr x 0.05 by the last epoch.")
@click.option("--augment", type=click.Choice(AUGMENTATIONS), default=TrainConfig.augment, show_default=True,
              help="Random flips, or flips and 90-degree turns (dihedral), of every patch.")
@click.option("--synthetic-defects", type=click.FloatRange(0, 1), default=TrainConfig.synthetic_defects,
              show_default=True, metavar="SHARE",
              help="Share of patches given a pasted synthetic defect (blob or crack) that the network "
                   "learns to remove (0: the paper). See docs/method.md.")
@click.option("--alexnet-weights", default=None, help="torchvision AlexNet state dict (needed by --loss fm).")
@click.option("--seed", default=TrainConfig.seed, show_default=True)
@click.option("--workers", default=RunConfig.workers, show_default=True,
              help="Data-parallel Ray Train workers.")
@click.option("--use-gpu/--no-gpu", default=None, help="Default: GPUs when the cluster has one per worker.")
@click.option("--storage", default=None, help="Run storage for checkpoints (path or s3://).")
@click.option("--run-name", default=None, help="Run name; rerunning with the same name resumes.")
@click.option("--checkpoint-every", default=RunConfig.checkpoint_every, show_default=True, help="Epochs.")
@click.option("--max-failures", default=RunConfig.max_failures, show_default=True,
              help="Restarts from the last checkpoint when a worker dies.")
@click.option("--cpus-per-worker", type=click.FloatRange(0, min_open=True), default=None,
              help="CPUs per worker (default: the cluster's CPUs shared by the workers, at least 1).")
@click.option("--wait-for-resources", type=click.FloatRange(0), default=ScanOptions.wait_for_resources,
              show_default=True, metavar="SECONDS",
              help="How long the workers may wait for their resources (an autoscaler adding "
                   "nodes) before the command gives up with exit status 2.")
@click.option("--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray).")
@click.option("--json", "as_json", is_flag=True)
def train(patches, model, loss, latent, epochs, batch_size, lr, weight_decay, precision,  # noqa: PLR0913 - one argument per click option
          lr_schedule, augment, synthetic_defects, alexnet_weights, seed, workers, use_gpu, storage, run_name,
          checkpoint_every, max_failures, cpus_per_worker, wait_for_resources, address, as_json):
    """Train an autoencoder on PATCHES with Ray Train and write the model directory MODEL."""
    from ray_inspect.distributed.train import TrainHooks, fit
    from ray_inspect.io.patches import open_patches

    if loss == "fm" and not alexnet_weights:
        raise click.UsageError("--loss fm needs --alexnet-weights FILE (ImageNet AlexNet state dict)")
    channels = open_patches(patches).shape[1]
    mcfg = ModelConfig(loss=loss, latent=latent, channels=channels)
    tcfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, seed=seed,
                       precision=precision, lr_schedule=lr_schedule, augment=augment,
                       synthetic_defects=synthetic_defects)
    run = RunConfig(workers=workers, use_gpu=use_gpu, storage=storage, run_name=run_name,
                    checkpoint_every=checkpoint_every, max_failures=max_failures, address=address,
                    cpus_per_worker=cpus_per_worker, wait_for_resources=wait_for_resources)
    tel = click.get_current_context().obj["telemetry"]
    lines = _EpochLines(tel, epochs)
    hooks = TrainHooks(on_epoch=lines, telemetry=tel.train(), on_step=lines.step)
    card = fit(patches, model, mcfg, tcfg, run, alexnet_weights, hooks)
    _emit({"model": model, "card": json.loads(card.to_json())}, as_json,
          f"{model}: {loss} model, final loss {card.training['final_loss']:.5f}")


class _EpochLines:
    """The progress line of every epoch, one when the run resumed from a checkpoint, and within an
    epoch a progress line (patches, patches/s, loss, ETA)."""

    def __init__(self, tel, epochs: int):
        self.tel, self.epochs = tel, epochs
        self.resumed: set[int] = set()
        self.line = None
        self.epoch = 0

    def step(self, s: dict) -> None:
        from ray_inspect.telemetry.progress import ProgressLine

        if self.line is None or s["epoch"] != self.epoch:
            self.line = ProgressLine(f"epoch {s['epoch']}/{self.epochs}", "patches", self.tel.say,
                                     json_logs=self.tel.cfg.log_format == "json")
            self.epoch = s["epoch"]
        self.line.update(s["patches"], s["of"], elapsed=s["seconds"], loss=f"{s['loss']:.5f}")

    def __call__(self, s: dict) -> None:
        if self.line is not None:
            self.line.interrupt()
            self.line = None
        if s["resumed_from"] and s["resumed_from"] not in self.resumed:
            self.resumed.add(s["resumed_from"])
            self.tel.say(f"resumed from epoch {s['resumed_from']} (last checkpoint)",
                         resumed_from=s["resumed_from"])
        workers = f"{s['workers']} worker{'s' if s['workers'] > 1 else ''}"
        self.tel.say(f"epoch {s['epoch']:>4}/{self.epochs}  loss {s['loss']:.5f}  "
                     f"{s['patches_per_s']:.0f} patches/s  ({workers})",
                     **{k: s[k] for k in ("epoch", "loss", "patches_per_s", "workers")})


def _inspect_cfg(stride, precision, batch_size, max_pixels):
    return InspectConfig(stride=stride, precision=precision, batch_size=batch_size, max_pixels=max_pixels)


inspect_options = [
    click.option("--stride", default=InspectConfig.stride, show_default=True,
                 help="Window stride in pixels."),
    click.option("--precision", type=click.Choice(PRECISIONS), default=InspectConfig.precision,
                 show_default=True),
    click.option("--batch-size", default=InspectConfig.batch_size, show_default=True,
                 help="Tiles per forward."),
    click.option("--max-pixels", type=click.IntRange(1), default=InspectConfig.max_pixels, show_default=True,
                 help="Images whose header says more pixels are refused (errors.jsonl, kind size), "
                      "never decoded."),
]


def _with(options):
    def deco(f):
        for o in reversed(options):
            f = o(f)
        return f
    return deco


@main.command()
@click.argument("model")
@click.argument("images")
@click.option("--min-area", type=int, default=None,
              help="MVTec rule: no region of A pixels on validation images.")
@click.option("--fpr", type=float, default=None,
              help="Target pixel false-positive rate on validation images.")
@click.option("--smooth-sigma", type=float, default=ScoreConfig.smooth_sigma, show_default=True,
              help="Smooth the residual with a Gaussian of this sigma (px at processing scale); "
                   "0 = the paper.")
@click.option("--normalise", type=click.Choice(NORMALISERS), default=ScoreConfig.normalise, show_default=True,
              help="position: score each pixel against the validation images' residual at that position; "
                   "features: by how unusual its local image structure and residual are; features+position: "
                   "that, as a z-score at each position (aligned parts; docs/method.md).")
@click.option("--adapt-contrast", type=click.FloatRange(0, 1), default=ScoreConfig.adapt_contrast,
              show_default=True,
              help="With feature normalisation: how far each image's own contrast rescales its features "
                   "(0 off, 1 fully; items or lighting that vary from image to image).")
@_with(inspect_options)
@click.option("--json", "as_json", is_flag=True)
def calibrate(model, images, min_area, fpr, smooth_sigma, normalise, adapt_contrast,  # noqa: PLR0913 - one argument per click option
              stride, precision, batch_size, max_pixels, as_json):
    """Set MODEL's score and threshold from defect-free IMAGES (ROOT/validation/good or a folder)."""
    from ray_inspect.steps.calibrate import calibrate as run

    if (min_area is None) == (fpr is None):
        raise click.UsageError("give exactly one of --min-area or --fpr")
    try:
        score = ScoreConfig(smooth_sigma=smooth_sigma, normalise=normalise, adapt_contrast=adapt_contrast)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    cfg = _inspect_cfg(stride, precision, batch_size, max_pixels)
    res = run(model, images, min_area, fpr, cfg, score=score)
    how = "paper residual" if score.is_paper else f"smooth_sigma {smooth_sigma:g}, normalise {normalise}"
    if adapt_contrast:
        how += f", adapt_contrast {adapt_contrast:g}"
    _emit(res, as_json, f"{model}: threshold {res['threshold']:.5g} ({res['rule']}, {res['images']} images; "
                        f"{how})")


class _ScanProgress:
    """The scan's progress: images done, images/s, tiles/s, failures and ETA (telemetry.progress)."""

    def __init__(self, tel):
        from ray_inspect.telemetry.progress import ProgressLine

        self.line = ProgressLine("scan", "images", tel.say, json_logs=tel.cfg.log_format == "json")

    def __call__(self, p) -> None:
        elapsed = max(self.line.elapsed(), 1e-9)
        self.line.update(p.done, None if p.listing else p.total, fresh=p.done - p.skipped,
                         **{"tiles/s": round(p.tiles / elapsed), "failed": p.failed, "resumed": p.skipped})

    def close(self) -> None:
        self.line.close()


@main.command()
@click.argument("model")
@click.argument("source")
@click.argument("out")
@_with(inspect_options)
@click.option("--threshold", type=float, default=None, help="Override the model card's threshold.")
@click.option("--workers", type=click.IntRange(1), default=None,
              help="Scan actors (default: one per GPU, else one per CPU).")
@click.option("--gpus-per-worker", type=click.FloatRange(0), default=None,
              help="GPUs per actor (default: 1 when the cluster has GPUs up, else 0); asked for, and waited "
                   "for, whether the cluster has them yet or not.")
@click.option("--cpus-per-worker", type=click.FloatRange(1), default=None,
              help="CPUs per actor (default: the cluster's CPUs shared by the actors).")
@click.option("--concurrency", type=click.IntRange(1), default=None,
              help="Images an actor works on at once (default: one computing per CPU, or one per GPU, plus "
                   "one reading or writing); 1 gives one image at a time all of the actor's CPUs.")
@click.option("--region-pixels", type=click.IntRange(1), default=InspectConfig.region_pixels,
              show_default=True,
              help="Images with more pixels are processed in bands of about this many (bounded memory).")
@click.option("--force", is_flag=True, help="Redo images whose outputs are already complete.")
@click.option("--date", "night", default=None, metavar="YYYY-MM-DD",
              help="The date that {date} in SOURCE and OUT stands for (default: yesterday in --timezone).")
@click.option("--timezone", default="UTC", show_default=True, envvar="RAY_INSPECT_TIMEZONE",
              help="Time zone of the default --date (IANA name; env RAY_INSPECT_TIMEZONE).")
@click.option("--allow-bad-inputs", is_flag=True,
              help="Exit 0 when the only images not scanned are bad inputs (still listed in OUT/errors.jsonl "
                   "and counted in the metrics); storage failures and lost actors still exit 3.")
@click.option("--wait-for-resources", type=click.FloatRange(0), default=ScanOptions.wait_for_resources,
              show_default=True, metavar="SECONDS",
              help="How long the scan actors may wait for their resources (an autoscaler adding "
                   "nodes) before the command gives up with exit status 2.")
@click.option("--keys", "keys_file", default=None, metavar="FILE|s3://...",
              help="Scan the keys this file lists (one per line, relative to SOURCE; or CSV in the S3 "
                   "Inventory layout) instead of listing SOURCE. Keys with no object go to errors.jsonl.")
@click.option("--image-timeout", type=click.FloatRange(0, min_open=True), default=None, metavar="SECONDS",
              help="An image not done after this long on its actor is recorded as timeout (after "
                   "--max-attempts tries) and its actor replaced (default: no limit).")
@click.option("--max-attempts", type=click.IntRange(1), default=ScanOptions.max_attempts, show_default=True,
              help="Tries of an image whose actor dies or that times out.")
@click.option("--lease-stale", type=click.FloatRange(1), default=ScanOptions.lease_stale, show_default=True,
              metavar="SECONDS",
              help="Another scan's lease on OUT without a heartbeat for this long is taken over.")
@click.option("--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def scan(ctx, model, source, out, stride, precision, batch_size, max_pixels, threshold, workers,  # noqa: PLR0913 - one argument per click option
         gpus_per_worker, cpus_per_worker, concurrency, region_pixels, force, night, timezone,
         allow_bad_inputs, wait_for_resources, keys_file, image_timeout, max_attempts, lease_stale, address,
         as_json):
    """Scan SOURCE (MVTec root, folder or s3:// prefix) with MODEL on Ray actors into OUT.

    Rerunning the same command resumes: images whose outputs are complete for the same model and
    settings are skipped. SOURCE and OUT may hold {date} (or {date:FORMAT}, strftime) for one
    night's partition. Exit status: 0 every image scanned (or, with --allow-bad-inputs, every
    failure a bad input), 3 finished with images not scanned (listed in OUT/errors.jsonl), 2 the
    scan could not run.
    """
    import logging
    from dataclasses import replace

    from ray_inspect.distributed.scan import scan as run
    from ray_inspect.partitions import resolve
    from ray_inspect.records import ScanError
    from ray_inspect.report import SUMMARY_KEYS, summary_table

    tel = ctx.find_root().obj["telemetry"]
    source, out, day = resolve(source, out, night, timezone)
    if day is not None:
        tel.say(f"night of {day.isoformat()}: scanning {source} into {out}")

    options = ScanOptions(workers=workers, gpus_per_worker=gpus_per_worker,
                          cpus_per_worker=cpus_per_worker, concurrency=concurrency, force=force,
                          allow_bad_inputs=allow_bad_inputs, wait_for_resources=wait_for_resources,
                          keys=keys_file, image_timeout=image_timeout, max_attempts=max_attempts,
                          lease_stale=lease_stale, address=address)
    cfg = replace(_inspect_cfg(stride, precision, batch_size, max_pixels), region_pixels=region_pixels)
    bar = _ScanProgress(tel)
    shown = [0]

    def on_error(err: ScanError) -> None:
        shown[0] += 1
        if shown[0] > ERRORS_SHOWN:
            return
        bar.line.interrupt()
        tel.say(f"skipped {err.url}: {err.reason}", level=logging.WARNING, key=err.key, kind=err.kind)
        if shown[0] == ERRORS_SHOWN:
            tel.say(f"further images not scanned are not shown here: see {out}/errors.jsonl",
                    level=logging.WARNING)

    signal.signal(signal.SIGTERM, _stop)          # Kubernetes stops a pod with SIGTERM: clean up first
    try:
        summary = run(model, source, out, cfg, threshold, options=options, telemetry=tel.scan(),
                      progress=bar, on_error=on_error)
    finally:
        bar.close()
    m = summary.get("metrics", {})
    rep = {**{k: m.get(k) for k in SUMMARY_KEYS}, "scan": summary}
    _emit(summary, as_json, summary_table(rep))
    sys.exit(summary["exit_code"])


def _stop(signum, frame) -> None:
    """SIGTERM ends the command as an interruption: the scan records what it completed, gives its
    lease back and reports the failed run before the process exits."""
    raise SystemExit(128 + signum)


@main.command()
@click.argument("out")
@click.option("--worst", default=5, show_default=True, help="Overlays of the N highest-scoring images.")
@click.option("--json", "as_json", is_flag=True)
def report(out, worst, as_json):
    """Summarise the scan in OUT: metrics table, roc.png, overlays/ of the worst images."""
    from ray_inspect.report import SUMMARY_KEYS, summary_table, write_report

    rep = write_report(out, worst)
    data = {k: rep[k] for k in SUMMARY_KEYS}
    data.update({"metrics": rep["metrics"], "scan": rep["scan"], "written": rep["written"],
                 "ignored_records": rep["ignored_records"]})
    _emit(data, as_json, summary_table(rep) + "\n" + "\n".join(f"wrote {w}" for w in rep["written"]))


if __name__ == "__main__":
    main()
