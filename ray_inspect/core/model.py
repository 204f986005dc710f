"""The convolutional autoencoder of Bergmann et al. (Table 1), its VAE variant, and AlexNet features.

Encoder: nine convolutions down to a 1x1xd latent; decoder: the mirror image with transposed
convolutions. LeakyReLU(0.2) after every layer except the latent and the output, which are linear.
"""

from __future__ import annotations

import torch
from torch import nn

from ray_inspect.config import ModelConfig

# (out_channels, kernel, stride, padding) of conv1..conv8; conv9 maps 8x8 to the 1x1 latent.
ENCODER = [(32, 4, 2, 1), (32, 4, 2, 1), (32, 3, 1, 1), (64, 4, 2, 1),
           (64, 3, 1, 1), (128, 4, 2, 1), (64, 3, 1, 1), (32, 3, 1, 1)]
SLOPE = 0.2


def _act() -> nn.Module:
    return nn.LeakyReLU(SLOPE, inplace=True)


def _encoder(channels: int, latent_out: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    cin = channels
    for cout, k, s, p in ENCODER:
        layers += [nn.Conv2d(cin, cout, k, s, p), _act()]
        cin = cout
    layers.append(nn.Conv2d(cin, latent_out, 8, 1, 0))
    return nn.Sequential(*layers)


def _decoder(channels: int, latent: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.ConvTranspose2d(latent, ENCODER[-1][0], 8, 1, 0), _act()]
    outs = [c for c, *_ in ENCODER[:-1]][::-1] + [channels]
    for (cin, k, s, p), cout in zip(ENCODER[::-1], outs, strict=True):
        layers.append(nn.ConvTranspose2d(cin, cout, k, s, p))
        layers.append(_act())
    layers.pop()  # linear output
    return nn.Sequential(*layers)


def init_weights(module: nn.Module) -> None:
    """He init for LeakyReLU(0.2): PyTorch's default leaves the 18-layer net on a flat-grey plateau.

    The fan-in of a transposed convolution is in_channels * k^2 / stride^2 (each output pixel
    sees that many inputs), which is what keeps the signal's variance through the decoder.
    """
    gain = nn.init.calculate_gain("leaky_relu", SLOPE)
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, nn.ConvTranspose2d):
            fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1] / (m.stride[0] * m.stride[1])
        else:
            continue
        nn.init.normal_(m.weight, 0.0, gain / fan_in**0.5)
        nn.init.zeros_(m.bias)


class ConvAE(nn.Module):
    """Deterministic autoencoder (SSIM-AE, L2-AE and feature-matching AE share it)."""

    def __init__(self, cfg: ModelConfig = ModelConfig()):
        super().__init__()
        self.cfg = cfg
        self.encoder = _encoder(cfg.channels, cfg.latent)
        self.decoder = _decoder(cfg.channels, cfg.latent)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class ConvVAE(nn.Module):
    """Variational variant: the encoder predicts mean and log-variance of Q(z|x)."""

    def __init__(self, cfg: ModelConfig = ModelConfig(loss="vae")):
        super().__init__()
        self.cfg = cfg
        self.encoder = _encoder(cfg.channels, 2 * cfg.latent)
        self.decoder = _decoder(cfg.channels, cfg.latent)
        init_weights(self)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        mu, logvar = h.split(self.cfg.latent, dim=1)
        return mu, logvar.clamp(-30.0, 20.0)

    def sample(self, mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None):
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + eps * (0.5 * logvar).exp()

    def forward(self, x: torch.Tensor):
        """Eval: reconstruction from the posterior mean. Train: (sampled reconstruction, mu, logvar),
        so that the whole loss flows through forward (as DistributedDataParallel needs)."""
        mu, logvar = self.encode(x)
        if not self.training:
            return self.decoder(mu)
        return self.decoder(self.sample(mu, logvar)), mu, logvar


def build_model(cfg: ModelConfig) -> nn.Module:
    return ConvVAE(cfg) if cfg.loss == "vae" else ConvAE(cfg)


class AlexNetFeatures(nn.Module):
    """The first three convolutions of torchvision's AlexNet (same parameter names), frozen.

    Loads ``features.0/3/6`` from a torchvision ``alexnet`` state dict file; returns the
    activations after the ReLU of each of the three layers.
    """

    MEAN = (0.485, 0.456, 0.406)
    STD = (0.229, 0.224, 0.225)

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(),
        )
        self.register_buffer("mean", torch.tensor(self.MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_state_dict(cls, state: object, source: str) -> "AlexNetFeatures":
        """The frozen features from a torchvision ``alexnet`` state dict (or module) read from ``source``."""
        net = cls()
        if isinstance(state, nn.Module):
            state = state.state_dict()
        if not isinstance(state, dict):
            raise ValueError(f"{source}: not an AlexNet state dict (a {type(state).__name__})")
        wanted = {k: v for k, v in state.items()
                  if k.split(".")[0] == "features" and int(k.split(".")[1]) <= 6}
        missing = [k for k in net.state_dict() if k not in wanted]
        if missing:
            raise ValueError(f"{source}: not an AlexNet state dict (missing {', '.join(missing)})")
        net.load_state_dict(wanted)
        return net

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = (x - self.mean) / self.std
        feats = []
        for layer in self.features:
            x = layer(x)
            if isinstance(layer, nn.ReLU):
                feats.append(x)
        return feats
