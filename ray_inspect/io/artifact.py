"""The model artifact: a directory (local or s3://) with weights and a JSON card.

Weights go to a content-addressed file first and ``card.json``, which names them, is written
last in one atomic PUT/rename: a reader sees the old model or the new one, never a mix.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import math
import platform
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from ray_inspect.config import MAX_SCALE, ModelConfig, ScoreConfig, from_dict
from ray_inspect.core.model import AlexNetFeatures, build_model
from ray_inspect.core.scoring import (
    N_FEATURES,
    N_IMAGE_FEATURES,
    FeaturePositionStats,
    FeatureStats,
    PositionStats,
    Stats,
)
from ray_inspect.io import storage
from ray_inspect.io.images import scaled_shape

CARD = "card.json"
FORMAT = 1
ARCHITECTURE = "bergmann2019-cae"
_SHA256 = re.compile(r"[0-9a-f]{64}")


def score_range(loss: str) -> tuple[float, float]:
    """Value range of a residual: 1 - SSIM lies in [0, 2]; squared errors of [0, 1] images in [0, 1]."""
    return (0.0, 2.0) if loss == "ssim" else (0.0, 1.0)


def package_versions() -> dict[str, str]:
    import numpy
    import skimage

    from ray_inspect import __version__

    return {"ray_inspect": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "scikit_image": skimage.__version__, "python": platform.python_version()}


@dataclass(frozen=True)
class ModelCard:
    """Everything needed to use a trained model the way it was meant to be used."""

    model: ModelConfig
    resize: int | None = 256
    source_size: tuple[int, int] | None = None   # training images' (H, W) before the resize
    scale: float | None = None                   # one factor for every image (aspect ratio kept)
    score: ScoreConfig = ScoreConfig()           # residual -> score (the paper: the residual as is)
    normaliser: str = ""                         # file of the statistics score.normalise learned
    normaliser_sha256: str = ""
    threshold: float | None = None
    threshold_rule: dict[str, Any] | None = None
    score_range: tuple[float, float] = (0.0, 2.0)
    training: dict[str, Any] = field(default_factory=dict)
    patches: dict[str, Any] = field(default_factory=dict)   # source URL, fingerprint, count
    versions: dict[str, str] = field(default_factory=dict)
    created: str = ""
    weights: str = ""
    weights_sha256: str = ""
    architecture: str = ARCHITECTURE
    format: int = FORMAT

    def processing_shape(self, height: int, width: int) -> tuple[int, int]:
        """Images are scaled by the card's factor, aspect ratio kept. Older cards scale by the factor
        that took the first training image to ``resize``, or to a fixed ``resize`` x ``resize``."""
        if self.scale is not None:
            return scaled_shape(height, width, self.scale)
        if self.resize is None:
            return height, width
        if not self.source_size:
            return self.resize, self.resize
        sh, sw = self.source_size
        return max(1, round(height * self.resize / sh)), max(1, round(width * self.resize / sw))

    def to_json(self) -> str:
        d = asdict(self)
        d["score_range"] = list(self.score_range)
        if self.scale is None:        # an older card reads and writes as it was
            del d["scale"]
        if self.score.is_paper and not self.normaliser:
            for k in ("score", "normaliser", "normaliser_sha256"):
                del d[k]
        return json.dumps(d, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelCard:
        """A card as written; keys this version does not know (an older card's ``stride``) are ignored."""
        d = json.loads(text)
        d["model"] = from_dict(ModelConfig, d["model"])
        d["score_range"] = tuple(d.get("score_range", score_range(d["model"].loss)))
        d["source_size"] = tuple(d["source_size"]) if d.get("source_size") else None
        d["score"] = from_dict(ScoreConfig, d.get("score") or {})
        return from_dict(cls, d)

    @property
    def fingerprint(self) -> str:
        """Identity of the model and the settings that change its outputs."""
        key = [self.weights_sha256, self.resize, self.source_size, self.threshold, asdict(self.model)]
        if self.scale is not None or not self.score.is_paper:   # older cards keep their fingerprint
            score = asdict(self.score)
            if not score["adapt_contrast"]:
                del score["adapt_contrast"]
            key += [self.scale, score, self.normaliser_sha256]
        key = json.dumps(key, sort_keys=True)
        return hashlib.sha256(key.encode()).hexdigest()[:16]


def save_model(url: str, model: nn.Module, card: ModelCard) -> ModelCard:
    """Write weights then the card; returns the card as written."""
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, buf)
    data = buf.getvalue()
    sha = hashlib.sha256(data).hexdigest()
    name = f"weights-{sha[:16]}.pt"
    storage.write_bytes(storage.join(url, name), data)
    card = replace(card, weights=name, weights_sha256=sha, versions=package_versions(),
                   created=card.created or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    storage.write_text(storage.join(url, CARD), card.to_json())
    return card


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _sha256(v: Any) -> bool:
    return isinstance(v, str) and _SHA256.fullmatch(v) is not None


def _file_name(v: Any) -> bool:
    """A plain file name inside the model directory: no separators, not '.' or '..'."""
    return isinstance(v, str) and bool(v) and v not in (".", "..") and not re.search(r"[/\\\x00]", v)


def _card_problem(d: Any) -> str | None:
    """What makes a card's JSON unusable, in a few words, or None. Cards come from outside (object
    stores, other teams): every field the scan reads is checked before anything runs on it."""
    if not isinstance(d, dict) or not isinstance(d.get("model"), dict):
        return "no model section"
    m = d["model"]
    checks = [
        (d.get("format", FORMAT) == FORMAT, f"format {d.get('format')!r}, this version reads {FORMAT}"),
        (d.get("architecture", ARCHITECTURE) == ARCHITECTURE, f"architecture {d.get('architecture')!r}"),
        (all(_positive_int(m.get(k, 1)) for k in ("latent", "channels", "patch", "vae_samples")),
         "model sizes must be positive integers"),
        (_number(m.get("fm_lambda", 1.0)), "fm_lambda must be a number"),
        (d.get("resize") is None or _positive_int(d["resize"]), "resize must be a positive integer or null"),
        (d.get("scale") is None or (_number(d["scale"]) and 0 < d["scale"] <= MAX_SCALE),
         f"scale must be a number in (0, {MAX_SCALE:g}]"),
        (not d.get("source_size") or (isinstance(d["source_size"], list) and len(d["source_size"]) == 2
                                      and all(_positive_int(v) for v in d["source_size"])),
         "source_size must be two positive integers"),
        (d.get("threshold") is None or _number(d["threshold"]), "threshold must be a number or null"),
        ("score_range" not in d or (isinstance(d["score_range"], list) and len(d["score_range"]) == 2
                                    and all(_number(v) for v in d["score_range"])
                                    and d["score_range"][0] < d["score_range"][1]),
         "score_range must be two increasing numbers"),
        (_file_name(d.get("weights")), "weights must name a file in the model directory"),
        (_sha256(d.get("weights_sha256")), "weights_sha256 must be a sha256 hex digest"),
        (not d.get("normaliser") or (_file_name(d["normaliser"]) and _sha256(d.get("normaliser_sha256"))),
         "normaliser must name a file in the model directory, with its sha256"),
    ]
    return next((why for ok, why in checks if not ok), None)


def read_card(url: str) -> ModelCard:
    """The card of a model directory, checked field by field; a bad one raises one line naming it."""
    path = storage.join(url, CARD)
    try:
        text = storage.read_text(path)
    except storage.StorageError:
        raise storage.StorageError(f"{url}: not a model directory (no readable {CARD})") from None
    try:
        problem = _card_problem(json.loads(text))
        if problem:
            raise ValueError(problem)
        return ModelCard.from_json(text)
    except (KeyError, ValueError, TypeError) as exc:
        raise ValueError(f"{path}: invalid model card ({exc})") from None


def write_card(url: str, card: ModelCard) -> None:
    storage.write_text(storage.join(url, CARD), card.to_json())


def load_model(url: str, device: str | torch.device = "cpu", card: ModelCard | None = None) -> nn.Module:
    """The trained model in eval mode, its card as ``model.card``; weights load with weights_only=True.

    ``card``: the card already read (a scan's driver hands its card to every actor, so a model
    retrained into the same directory mid-scan cannot mix in). Every failure is one line naming
    the file: missing weights, a checksum that does not match, weights of another model.
    """
    card = card or read_card(url)
    path = storage.join(url, card.weights)
    data = storage.read_bytes(path)
    if hashlib.sha256(data).hexdigest() != card.weights_sha256:
        raise ValueError(f"{path}: checksum does not match the card")
    model = build_model(card.model)
    try:
        model.load_state_dict(torch.load(io.BytesIO(data), map_location=device, weights_only=True))
    except Exception as exc:  # noqa: BLE001 - unpickling or shape errors: one line, never a traceback
        why = storage.short_reason(exc)
        raise ValueError(f"{path}: weights do not fit the card's model ({why})") from None
    model.card = card
    model.normaliser = load_normaliser(url, card)
    return model.eval().to(device)


def save_normaliser(url: str, stats: Stats) -> tuple[str, str]:
    """Write position or feature statistics content-addressed beside the weights; returns
    (file name, sha256)."""
    buf = io.BytesIO()
    features = stats.features if isinstance(stats, FeaturePositionStats) else stats
    position = stats.position if isinstance(stats, FeaturePositionStats) else stats
    arrays = {}
    if isinstance(features, FeatureStats) and features.adapt > 0:   # a key a reader without adaptation lacks
        arrays.update(feature_mean=features.mean, whiten_adapted=features.whiten,
                      adapt=np.float64(features.adapt), contrast_reference=features.reference)
    elif isinstance(features, FeatureStats):
        arrays.update(feature_mean=features.mean, whiten=features.whiten)
    if isinstance(position, PositionStats):
        arrays.update(mean=position.mean, std=position.std)
    np.savez(buf, **arrays)
    data = buf.getvalue()
    sha = hashlib.sha256(data).hexdigest()
    name = f"normaliser-{sha[:16]}.npz"
    storage.write_bytes(storage.join(url, name), data)
    return name, sha


def load_normaliser(url: str, card: ModelCard) -> Stats | None:
    """The card's statistics (None when it has none), checked against its checksum and against
    the kind its score needs."""
    if not card.normaliser:
        return None
    path = storage.join(url, card.normaliser)
    data = storage.read_bytes(path)
    if hashlib.sha256(data).hexdigest() != card.normaliser_sha256:
        raise ValueError(f"{path}: checksum does not match the card")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError) as exc:
        raise ValueError(f"{path}: not a normaliser file ({exc})") from None
    kind = card.score.normalise
    keys = {"features": ("feature_mean",), "position": ("mean", "std"),
            "features+position": ("feature_mean", "mean", "std")}.get(kind, ())
    if not keys or not all(k in arrays for k in keys):
        raise ValueError(f"{path}: not a {kind} normaliser file (it holds {', '.join(sorted(arrays))})")
    features = _feature_stats(path, arrays, card.score.adapt_contrast) if "feature_mean" in keys else None
    position = _position_stats(path, arrays) if "std" in keys else None
    if features is not None and position is not None:
        return FeaturePositionStats(features, position)
    return features or position


def _feature_stats(path: str, arrays: dict[str, np.ndarray], adapt: float) -> FeatureStats:
    """Adapted statistics keep their whitening under another key, so that a reader that knows no
    adaptation refuses them instead of scoring without it."""
    stored = arrays.get("adapt", np.float64(0.0))
    stored = float(stored) if np.shape(stored) == () else float("nan")
    if stored != adapt:
        raise ValueError(f"{path}: learned with contrast adaptation {stored:g}, the card says {adapt:g}")
    mean = arrays["feature_mean"].astype(np.float64)
    whiten = arrays.get("whiten_adapted" if adapt else "whiten", np.zeros(0)).astype(np.float64)
    if mean.shape != (N_FEATURES,) or whiten.shape != (N_FEATURES, N_FEATURES) \
            or not (np.isfinite(mean).all() and np.isfinite(whiten).all()):
        raise ValueError(f"{path}: feature statistics are malformed")
    if not adapt:
        return FeatureStats(mean, whiten)
    reference = arrays.get("contrast_reference", np.zeros(0)).astype(np.float64)
    if reference.shape != (N_IMAGE_FEATURES,) or not (np.isfinite(reference).all() and (reference > 0).all()):
        raise ValueError(f"{path}: contrast reference is malformed")
    return FeatureStats(mean, whiten, adapt, reference)


def _position_stats(path: str, arrays: dict[str, np.ndarray]) -> PositionStats:
    mean, std = arrays["mean"].astype(np.float32), arrays["std"].astype(np.float32)
    if mean.ndim != 2 or mean.shape != std.shape or not (np.isfinite(mean).all() and (std > 0).all()):
        raise ValueError(f"{path}: normaliser maps are malformed")
    return PositionStats(mean, std)


def load_alexnet(path: str) -> AlexNetFeatures:
    """The first three AlexNet layers from a torchvision state dict file (local or s3://), frozen."""
    try:
        state = torch.load(io.BytesIO(storage.read_bytes(path)), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - turn any unpickling failure into one clear line
        raise ValueError(f"{path}: not a readable AlexNet state dict "
                         f"({exc.__class__.__name__}: {exc})") from None
    return AlexNetFeatures.from_state_dict(state, path)
