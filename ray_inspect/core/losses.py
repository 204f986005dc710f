"""Training losses of the four variants; each returns a float32 scalar (the network may run in bf16)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ray_inspect.config import ModelConfig, SSIMConfig
from ray_inspect.core.model import AlexNetFeatures
from ray_inspect.core.ssim import ssim_loss

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
"""``loss(model, x, target)``: how far ``model(x)`` is from ``target`` (``x`` itself, or the clean
patch when ``x`` carries a synthetic defect)."""


def _ssim(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ssim_loss(model(x).float(), target.float(), SSIMConfig())


def _l2(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(model(x).float(), target.float())


def _vae(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(Sum of squared errors + KL(Q(z|x) || N(0, I))) per image, divided by the pixels per image."""
    recon, mu, logvar = model(x)
    mu, logvar = mu.float(), logvar.float()
    sse = ((recon.float() - target.float()) ** 2).flatten(1).sum(1)
    kl = -0.5 * (1 + logvar - mu**2 - logvar.exp()).flatten(1).sum(1)
    return ((sse + kl) / x[0].numel()).mean()


def _feature_matching(alexnet: AlexNetFeatures, lam: float) -> LossFn:
    def loss(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        recon = model(x)
        l2 = F.mse_loss(recon.float(), target.float())
        feats = sum(F.mse_loss(a.float(), b.float())
                    for a, b in zip(alexnet(recon), alexnet(target), strict=True))
        return l2 + lam * feats
    return loss


def make_loss(cfg: ModelConfig, alexnet: AlexNetFeatures | None = None) -> LossFn:
    if cfg.loss == "ssim":
        return _ssim
    if cfg.loss == "l2":
        return _l2
    if cfg.loss == "vae":
        return _vae
    if alexnet is None:
        raise ValueError("the feature-matching AE needs AlexNet weights: pass --alexnet-weights FILE")
    return _feature_matching(alexnet, cfg.fm_lambda)
