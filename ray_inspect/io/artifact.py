"""The model artifact: a directory (local or s3://) with weights and a JSON card.

Weights go to a content-addressed file first and ``card.json``, which names them, is written
last in one atomic PUT/rename: a reader sees the old model or the new one, never a mix.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import platform
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from ray_inspect.config import ModelConfig, ScoreConfig, from_dict
from ray_inspect.core.model import AlexNetFeatures, build_model
from ray_inspect.core.scoring import PositionStats
from ray_inspect.io import storage
from ray_inspect.io.images import scaled_shape

CARD = "card.json"
FORMAT = 1


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
    normaliser: str = ""                         # file of the position statistics (score.normalise)
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
    architecture: str = "bergmann2019-cae"
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
            key += [self.scale, asdict(self.score), self.normaliser_sha256]
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


def read_card(url: str) -> ModelCard:
    try:
        return ModelCard.from_json(storage.read_text(storage.join(url, CARD)))
    except storage.StorageError:
        raise storage.StorageError(f"{url}: not a model directory (no readable {CARD})") from None
    except (KeyError, ValueError, TypeError) as exc:
        raise ValueError(f"{storage.join(url, CARD)}: invalid model card ({exc})") from None


def write_card(url: str, card: ModelCard) -> None:
    storage.write_text(storage.join(url, CARD), card.to_json())


def load_model(url: str, device: str | torch.device = "cpu") -> nn.Module:
    """The trained model in eval mode, its card as ``model.card``; weights load with weights_only=True."""
    card = read_card(url)
    data = storage.read_bytes(storage.join(url, card.weights))
    if card.weights_sha256 and hashlib.sha256(data).hexdigest() != card.weights_sha256:
        raise ValueError(f"{storage.join(url, card.weights)}: checksum does not match the card")
    state = torch.load(io.BytesIO(data), map_location=device, weights_only=True)
    model = build_model(card.model)
    model.load_state_dict(state)
    model.card = card
    model.normaliser = load_normaliser(url, card)
    return model.eval().to(device)


def save_normaliser(url: str, stats: PositionStats) -> tuple[str, str]:
    """Write position statistics content-addressed beside the weights; returns (file name, sha256)."""
    buf = io.BytesIO()
    np.savez(buf, mean=stats.mean, std=stats.std)
    data = buf.getvalue()
    sha = hashlib.sha256(data).hexdigest()
    name = f"normaliser-{sha[:16]}.npz"
    storage.write_bytes(storage.join(url, name), data)
    return name, sha


def load_normaliser(url: str, card: ModelCard) -> PositionStats | None:
    """The card's position statistics (None when it has none), checked against its checksum."""
    if not card.normaliser:
        return None
    path = storage.join(url, card.normaliser)
    data = storage.read_bytes(path)
    if hashlib.sha256(data).hexdigest() != card.normaliser_sha256:
        raise ValueError(f"{path}: checksum does not match the card")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            mean, std = z["mean"].astype(np.float32), z["std"].astype(np.float32)
    except (ValueError, KeyError, OSError) as exc:
        raise ValueError(f"{path}: not a normaliser file ({exc})") from None
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
