"""Frozen configuration dataclasses: the single source of defaults (the paper's values)."""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

LOSSES = ("ssim", "l2", "vae", "fm")
PRECISIONS = ("float32", "bfloat16")
LR_SCHEDULES = ("constant", "cosine")
AUGMENTATIONS = ("none", "flips", "dihedral")
NORMALISERS = ("none", "position", "features", "features+position")
MAX_SCALE = 4.0                   # the largest image scale factor (prepare, model cards)
Z_MAX = 64.0                      # normalised scores are clipped to [0, Z_MAX] (the ROC's fixed bins)
LOG_FORMATS = ("text", "json")
PIPELINE_ENV = "RAY_INSPECT_PIPELINE"
DEVICE_ENV = "RAY_INSPECT_DEVICE"   # "cpu": compute on CPU where Ray assigned GPUs (tests on fake GPU nodes)


@dataclass(frozen=True)
class SSIMConfig:
    """SSIM parameters (Wang et al. 2004 as used by Bergmann et al.)."""

    window: int = 11
    sigma: float = 1.5
    k1: float = 0.01
    k2: float = 0.03
    data_range: float = 1.0
    alpha: float = 1.0
    beta: float = 1.0
    gamma: float = 1.0


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of Table 1: patch size, channels, latent size and the loss it is trained with."""

    loss: str = "ssim"
    latent: int = 100
    channels: int = 1
    patch: int = 128
    vae_samples: int = 6          # latent samples decoded for the VAE residual
    fm_lambda: float = 1.0        # weight of the AlexNet feature term (feature-matching AE)

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, not {self.channels}")
        if self.patch != 128:
            raise ValueError("the architecture of Table 1 takes 128x128 patches")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings: Adam, lr 2e-4, weight decay 1e-5, 200 epochs, batch 128."""

    epochs: int = 200
    batch_size: int = 128
    lr: float = 2e-4
    weight_decay: float = 1e-5
    seed: int = 0
    precision: str = "bfloat16"   # autocast for the network; losses are computed in float32
    lr_schedule: str = "constant"  # the paper's; "cosine" decays lr to lr * lr_floor over the epochs
    lr_floor: float = 0.05
    augment: str = "none"         # "flips" (horizontal, vertical) or "dihedral" (flips and 90-degree turns)
    synthetic_defects: float = 0.0  # share of patches given a pasted defect the network learns to remove

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch size must be positive")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr schedule must be one of {', '.join(LR_SCHEDULES)}, "
                             f"not {self.lr_schedule!r}")
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"augment must be one of {', '.join(AUGMENTATIONS)}, not {self.augment!r}")
        if not 0 <= self.synthetic_defects <= 1:
            raise ValueError(f"synthetic defects must be a share in [0, 1], not {self.synthetic_defects}")
        if not 0 < self.lr_floor <= 1:
            raise ValueError("lr floor must be in (0, 1]")

    def lr_at(self, epoch: int) -> float:
        """Learning rate of ``epoch`` (0-based): a function of the epoch alone, so a resumed run matches."""
        if self.lr_schedule == "constant" or self.epochs == 1:
            return self.lr
        floor = self.lr * self.lr_floor
        return floor + 0.5 * (self.lr - floor) * (1 + math.cos(math.pi * epoch / (self.epochs - 1)))


@dataclass(frozen=True)
class PrepareConfig:
    """Patch extraction: scale training images by one factor (aspect ratio kept), crop random patches.

    The factor is ``scale`` when given, else the one that takes the training images' smallest
    shorter side to ``short_side`` (never above 1); ``short_side=None`` keeps the original resolution. The
    paper's 1024 x 1024 -> 256 x 256 is ``short_side=256``.
    """

    patches: int = 10_000
    short_side: int | None = 256
    scale: float | None = None
    patch: int = 128
    channels: int = 1
    seed: int = 0
    chunk: int = 256              # patches per Zarr chunk along N

    def __post_init__(self) -> None:
        if self.scale is not None and not 0 < self.scale <= MAX_SCALE:
            raise ValueError(f"scale must be in (0, {MAX_SCALE:g}], not {self.scale}")
        if self.short_side is not None and self.short_side < self.patch:
            raise ValueError(f"short side must be at least the {self.patch}-px patch, not {self.short_side}")


@dataclass(frozen=True)
class ScoreConfig:
    """How the residual 1 - SSIM becomes the anomaly score that is thresholded (the paper: as is).

    ``smooth_sigma``: Gaussian smoothing in pixels at processing scale (0 = off). ``normalise``:
    "position" turns the score into a z-score against the defect-free images' residual at each
    position (learned by calibrate), clipped to [0, Z_MAX]; "features" into the Mahalanobis
    distance of each pixel's local image structure and residual from those of the defect-free
    images (learned by calibrate, then smoothed by ``smooth_sigma``), clipped likewise;
    "features+position" takes the z-score of that distance at each position (aligned parts).
    ``adapt_contrast`` (features only, 0 = off, 1 = full): how far each image's own spread of the
    image features rescales them towards the calibration images' (items or lighting that vary).
    """

    smooth_sigma: float = 0.0
    normalise: str = "none"
    adapt_contrast: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.smooth_sigma <= 32:
            raise ValueError(f"smoothing sigma must be in [0, 32] px, not {self.smooth_sigma}")
        if self.normalise not in NORMALISERS:
            raise ValueError(f"normalise must be one of {', '.join(NORMALISERS)}, not {self.normalise!r}")
        if not 0 <= self.adapt_contrast <= 1:
            raise ValueError(f"contrast adaptation must be in [0, 1], not {self.adapt_contrast}")
        if self.adapt_contrast and not self.normalise.startswith("features"):
            raise ValueError("contrast adaptation works on feature normalisation (normalise features or "
                             "features+position)")

    @property
    def is_paper(self) -> bool:
        return self.smooth_sigma == 0 and self.normalise == "none"


@dataclass(frozen=True)
class InspectConfig:
    """Inference: sliding windows, precision, segmentation."""

    stride: int = 30
    batch_size: int = 64          # tiles per forward (the speed measurements use 64: docs/benchmarks.md)
    precision: str = "bfloat16"
    opening_diameter: int = 4     # circular structuring element of diameter 4 (not disk(4), which is 9 wide)
    seed: int = 0                 # VAE latent sampling
    region_pixels: int = 1 << 24  # larger images go in bands of about this many pixels (bounded memory)
    max_pixels: int = 1 << 30     # larger images (by their header) are refused as ``size``, never decoded

    def __post_init__(self) -> None:
        if self.region_pixels < 1 or self.max_pixels < 1:
            raise ValueError("region_pixels and max_pixels must be positive")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}")
        if not 1 <= self.stride <= 128:
            raise ValueError("stride must be between 1 and the 128-px window (every pixel covered), "
                             f"not {self.stride}")


@dataclass(frozen=True)
class MetricsConfig:
    """Fixed histogram bins, so that ROC statistics of shards and machines can be summed."""

    bins: int = 65_536
    fpr_limit: float = 0.3


@dataclass(frozen=True)
class SynthConfig:
    """Synthetic woven-fabric data set, sized like the paper's MVTec fabrics."""

    texture: str = "plain"
    size: int = 512
    train: int = 100
    test_defective: int = 50
    test_good: int = 20
    validation: int = 10          # defect-free validation images (validation/good) for calibration
    seed: int = 0


@dataclass(frozen=True)
class RunConfig:
    """Where and how a training run executes."""

    workers: int = 1
    use_gpu: bool | None = None       # None: GPUs when the cluster has one per worker
    checkpoint_every: int = 1         # epochs between checkpoints (the last epoch always checkpoints)
    max_failures: int = 3             # worker-group restarts from the last checkpoint
    storage: str | None = None        # run storage (local path or s3://); default ~/.cache/ray-inspect/runs
    run_name: str | None = None       # default: derived from the inputs, so a rerun resumes
    address: str | None = None        # Ray cluster to join; default RAY_ADDRESS or a local Ray
    cpus_per_worker: float | None = None  # default: the cluster's CPUs shared among the workers
    wait_for_resources: float = 900.0     # seconds the workers may wait for nodes (an autoscaler adding them)


@dataclass(frozen=True)
class ScanOptions:
    """How the scan runs (not what it computes: none of these change an output)."""

    workers: int | None = None            # actors; default one per GPU, else one per CPU
    gpus_per_worker: float | None = None  # default 1 when the cluster has GPUs, else 0
    cpus_per_worker: float | None = None  # default: the cluster's CPUs shared among the actors
    concurrency: int | None = None        # images an actor works on at once; default: one per compute
                                          # slot plus one that reads or writes (waits on storage) while
                                          # the others compute
    depth: int | None = None              # images sent to an actor at once, default concurrency + 1: the
                                          # next image waits in the actor's queue, so no round trip to
                                          # the driver separates two images
    max_attempts: int = 3                 # an image whose actor dies (or that times out) this often is
                                          # recorded as lost (or as timed out)
    shard_size: int = 1000                # images of the listing per shard (statistics, manifest, ledger)
    image_timeout: float | None = None    # seconds an image may take on its actor (None: no limit)
    lease_stale: float = 120.0            # seconds without a heartbeat after which OUT's lease is stale
    keys: str | None = None               # a file of keys to scan (text or CSV) instead of listing SOURCE
    force: bool = False                   # redo images whose outputs are complete
    allow_bad_inputs: bool = False        # exit 0, not 3, when every failure is a bad input
    address: str | None = None            # Ray cluster to join (default RAY_ADDRESS, else local)
    wait_for_resources: float = 900.0     # seconds the actors may wait for nodes (an autoscaler adding them)


@dataclass(frozen=True)
class RetryPolicy:
    """The one retry policy for object storage. Every request the project makes (``storage``'s
    calls, training's patch reads) is tried ``attempts`` times with jittered exponential backoff,
    riding out an outage of ``budget()`` seconds; the S3 clients beneath it try once each, so that
    attempts never multiply. Ray Train's checkpoint writes (pyarrow) get the same attempts."""

    attempts: int = 10                # tries per request, the first included
    first_wait: float = 0.5           # seconds before the second try; doubles after each
    max_wait: float = 10.0            # the longest wait between two tries
    jitter: float = 1.0               # up to this many random seconds added to each wait
    connect_timeout: float = 10.0     # seconds to open a connection
    read_timeout: float = 60.0        # seconds without a byte from an open connection

    def wait(self, failed: int) -> float:
        """Seconds before the next try after ``failed`` failed tries (jitter not counted)."""
        return min(self.max_wait, self.first_wait * 2 ** (failed - 1))

    def budget(self) -> float:
        """The seconds a request keeps retrying, at least (jitter not counted)."""
        return sum(self.wait(n) for n in range(1, self.attempts))


@dataclass(frozen=True)
class TelemetryConfig:
    """How this process reports: metrics port (0 = off), bind address, Pushgateway, log format."""

    metrics_port: int = 0
    metrics_bind: str = "127.0.0.1"
    pushgateway: str | None = None
    log_format: str = "text"
    pipeline: str = field(default_factory=lambda: os.environ.get(PIPELINE_ENV) or "default")

    def __post_init__(self) -> None:
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {self.log_format!r}")
        if not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics port must be in 0..65535, not {self.metrics_port}")
        if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,100}", self.pipeline):
            raise ValueError(f"{PIPELINE_ENV} must be a short name ([A-Za-z0-9_.:-]), not {self.pipeline!r}")


def to_dict(cfg: Any) -> dict[str, Any]:
    return asdict(cfg)


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Build a config from a dict, ignoring keys this version does not know."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


__all__ = [
    "LOSSES", "PRECISIONS", "LR_SCHEDULES", "AUGMENTATIONS", "NORMALISERS", "Z_MAX", "ScoreConfig",
    "SSIMConfig", "ModelConfig", "TrainConfig", "PrepareConfig",
    "InspectConfig", "MetricsConfig", "SynthConfig", "RunConfig", "ScanOptions", "TelemetryConfig",
    "LOG_FORMATS", "PIPELINE_ENV", "to_dict", "from_dict", "replace", "field",
]
