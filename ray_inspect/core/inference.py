"""Tiles -> model -> averaged reconstruction -> residual map, for one image.

Works on torch tensors (C, H, W) in [0, 1]; no Ray, no click. The per-tile work is batched and
the averaging is an overlap-add divided by the (analytic) window coverage.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
import zlib
from dataclasses import replace
from itertools import pairwise

import numpy as np
import torch
from torch import nn

from ray_inspect.config import InspectConfig, ModelConfig, SSIMConfig
from ray_inspect.core.ssim import ssim_map
from ray_inspect.core.tiling import Band, TileGrid, extract_tiles, grid_for, overlap_add, pad_to_patch


def precision_context(precision: str, device: torch.device):
    """bfloat16 autocast (the network only) or nothing for float32."""
    if precision == "bfloat16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def bf16_supported(device: torch.device | str = "cpu") -> bool:
    """Native bfloat16 matrix units: AVX-512 BF16 / AMX on CPUs (oneDNN's check), any recent GPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device | str = "cpu") -> str:
    """bfloat16 where the hardware runs it natively, else float32 (emulated bf16 is slower)."""
    if precision == "bfloat16" and not bf16_supported(device):
        warnings.warn("this processor has no native bfloat16 support; running the network in float32",
                      stacklevel=2)
        return "float32"
    return precision


def prepare_model(model: nn.Module, precision: str, device: torch.device | str = "cpu",
                  fuse: bool = True) -> nn.Module:
    """Eval mode on ``device``; channels-last for bfloat16, where oneDNN/cuDNN are fastest; on a
    CPU with native bfloat16 (unless ``fuse`` is off), convolution stacks run fused
    (``_FusedConvStack``). The caller's model stays as it was (mode, device, dtype, memory format):
    whatever has to change is changed on a copy."""
    device = torch.device(device)
    moved = any(p.device != device for p in model.parameters())
    if model.training or moved or precision == "bfloat16":
        model = copy.deepcopy(model)
    model = model.eval().to(device)
    if precision != "bfloat16":
        return model
    model = model.to(memory_format=torch.channels_last)
    if not fuse or device.type != "cpu" or not bf16_supported(device) \
            or not hasattr(torch.ops.mkldnn, "_convolution_pointwise"):
        return model
    stacks = {name: m for name, m in model.named_children() if _FusedConvStack.fusable(m)}
    if not stacks:
        return model
    fused = copy.copy(model)
    fused._modules = dict(model._modules)
    for name, m in stacks.items():
        setattr(fused, name, _FusedConvStack(m))
    return fused


class _FusedConvStack(nn.Module):
    """A Sequential of convolutions and LeakyReLUs run as oneDNN bfloat16 convolutions with the
    activation fused into each (a post-op): faster than autocast's forward, where a separate
    in-place activation pass re-reads every activation from memory (docs/benchmarks.md).
    Outputs are bfloat16 like autocast's, and agree with them to a bfloat16 rounding step."""

    def __init__(self, seq: nn.Sequential):
        super().__init__()
        mods, self.steps = list(seq), []
        # the convolutions as submodules, for parameters() and the device
        self.convs = nn.ModuleList(m for m in mods if not isinstance(m, nn.LeakyReLU))
        for i, conv in enumerate(mods):
            if isinstance(conv, nn.LeakyReLU):
                continue
            act = mods[i + 1] if i + 1 < len(mods) and isinstance(mods[i + 1], nn.LeakyReLU) else None
            w = conv.weight.detach().to(torch.bfloat16)
            b = None if conv.bias is None else conv.bias.detach().to(torch.bfloat16)
            attr, scalars = ("leaky_relu", [act.negative_slope]) if act is not None else ("none", [])
            pad, stride, dil = list(conv.padding), list(conv.stride), list(conv.dilation)
            if isinstance(conv, nn.ConvTranspose2d):
                op, args = torch.ops.mkldnn._convolution_transpose_pointwise, (pad, list(conv.output_padding))
            else:
                op, args = torch.ops.mkldnn._convolution_pointwise, (pad,)
            self.steps.append((op, w, b, (*args, stride, dil, 1, attr, scalars, "")))

    @staticmethod
    def fusable(m: nn.Module) -> bool:
        convs = (nn.Conv2d, nn.ConvTranspose2d)
        if not isinstance(m, nn.Sequential) or len(m) == 0 or not isinstance(m[0], convs):
            return False
        for x in m:
            if isinstance(x, convs):
                if x.groups != 1 or x.padding_mode != "zeros" or isinstance(x.padding, str):
                    return False
            elif not isinstance(x, nn.LeakyReLU):
                return False
        return not any(isinstance(a, nn.LeakyReLU) and isinstance(b, nn.LeakyReLU) for a, b in pairwise(m))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        for op, w, b, args in self.steps:
            x = op(x, w, b, *args)
        return x


class Reconstructor:
    """Runs a model over the sliding-window grid of an image and averages the overlaps."""

    def __init__(self, model: nn.Module, model_cfg: ModelConfig, cfg: InspectConfig = InspectConfig(),
                 ssim_cfg: SSIMConfig = SSIMConfig()):
        self.model = model
        self.model_cfg = model_cfg
        self.device = next(model.parameters()).device
        self.cfg = replace(cfg, precision=resolve_precision(cfg.precision, self.device))
        self.ssim_cfg = ssim_cfg
        self.patch = model_cfg.patch

    def _forward(self, tiles: torch.Tensor) -> torch.Tensor:
        if self.cfg.precision == "bfloat16":
            tiles = tiles.contiguous(memory_format=torch.channels_last)
        return self.model(tiles)  # bf16 under autocast; overlap_add accumulates in float32

    def _vae_nll(self, tiles: torch.Tensor, positions: np.ndarray, key: int) -> torch.Tensor:
        """Per-pixel negative log reconstruction probability from N decoded posterior samples.

        Gaussian decoder with variance 1/2 (the one the VAE loss assumes), additive constant
        dropped; the noise of each window is seeded by its position, so results do not depend
        on the batch size or on how an image is split.
        """
        n = self.model_cfg.vae_samples
        if self.cfg.precision == "bfloat16":
            tiles = tiles.contiguous(memory_format=torch.channels_last)
        mu, logvar = self.model.encode(tiles)
        mu, logvar = mu.float(), logvar.float()
        eps = torch.stack([
            torch.randn((n,) + mu.shape[1:], generator=torch.Generator().manual_seed(
                _window_seed(key, self.cfg.seed, int(y), int(x))))
            for y, x in positions
        ]).to(self.device)  # (B, n, d, 1, 1)
        z = mu[:, None] + eps * (0.5 * logvar[:, None]).exp()
        dec = self.model.decoder(z.flatten(0, 1)).float().unflatten(0, (len(tiles), n))
        return ((tiles.float()[:, None] - dec) ** 2).mean(dim=1)

    def grid(self, height: int, width: int) -> TileGrid:
        """The window grid of a (padded) image of this size."""
        return grid_for(height, width, self.patch, self.cfg.stride)

    def windows(self, height: int, width: int) -> int:
        """Windows run over a whole image of this size (it is padded up to a window first)."""
        return len(self.grid(max(height, self.patch), max(width, self.patch)))

    def run(self, image: torch.Tensor, key: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Averaged reconstruction of a whole (C, H, W) image (and, for the VAE, its averaged NLL map)."""
        c, h, w = image.shape
        padded = pad_to_patch(image.to(self.device, torch.float32), self.patch)
        grid = self.grid(padded.shape[1], padded.shape[2])
        recon, nll = self.run_band(padded, grid, Band.whole(grid, h), key)
        return recon[..., :w], (None if nll is None else nll[..., :w])

    def run_band(self, rows: torch.Tensor, grid: TileGrid, band: Band,
                 key: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Averaged reconstruction of ``band.recon_rows``, given the image rows ``band.input_rows``
        as a (C, n, W) tensor; only the band's windows are run."""
        i0 = band.input_rows[0]
        rows = rows.to(self.device, torch.float32)
        acc = torch.zeros_like(rows)
        nll = torch.zeros_like(rows) if self.model_cfg.loss == "vae" else None
        # Windows are gathered from a bf16 copy when the network runs in bf16 anyway (half the
        # memory traffic); one autocast region per band casts the weights once, not per batch.
        src = rows.to(torch.bfloat16) if self.cfg.precision == "bfloat16" and nll is None else rows
        with torch.inference_mode(), precision_context(self.cfg.precision, self.device):
            for start, stop in grid.batches(self.cfg.batch_size, band.grid_rows):
                pos = grid.positions[start:stop]
                local = pos - np.array([i0, 0])
                tiles = extract_tiles(src, local, self.patch)
                overlap_add(acc, self._forward(tiles), local)
                if nll is not None:
                    overlap_add(nll, self._vae_nll(tiles, pos, key), local)
        c0, c1 = band.recon_rows
        whole = (c0, c1) == (0, grid.height)
        cover = (grid.coverage if whole else grid.coverage_rows(c0, c1)).to(self.device)
        recon = acc[:, c0 - i0 : c1 - i0].div_(cover).clamp_(0.0, 1.0)
        if nll is not None:
            nll = nll[:, c0 - i0 : c1 - i0] / cover
        return recon, nll

    def residual(self, image: torch.Tensor, recon: torch.Tensor,
                 nll: torch.Tensor | None = None) -> torch.Tensor:
        """(H, W) residual: 1 - SSIM (SSIM-AE), squared error (L2-AE, FM-AE) or NLL (VAE), channel mean."""
        image = image.to(recon.device, torch.float32)
        if self.model_cfg.loss == "ssim":
            r = 1.0 - ssim_map(image[None], recon[None], self.ssim_cfg)[0]
        elif self.model_cfg.loss == "vae":
            r = nll
        else:
            r = (image - recon) ** 2
        return r.mean(dim=0)


def _window_seed(key: int, seed: int, y: int, x: int) -> int:
    return zlib.crc32(f"{seed}:{key}:{y}:{x}".encode()) & 0x7FFFFFFF


def to_chw(image: np.ndarray) -> torch.Tensor:
    """(H, W) or (H, W, C) numpy in [0, 1] -> (C, H, W) float32 tensor."""
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.ndim == 3:
        arr = np.moveaxis(arr, -1, 0)
    else:
        raise ValueError(f"expected an (H, W) or (H, W, C) image, got shape {arr.shape}")
    return torch.from_numpy(np.ascontiguousarray(arr))


def from_chw(t: torch.Tensor, like: np.ndarray) -> np.ndarray:
    out = t.detach().cpu().numpy()
    return out[0] if np.ndim(like) == 2 else np.moveaxis(out, 0, -1)


def reconstruct(model: nn.Module, image: np.ndarray, stride: int = 30, precision: str = "float32",
                batch_size: int = 64) -> np.ndarray:
    """Averaged sliding-window reconstruction of an image, float32 numpy shaped like ``image``."""
    cfg = getattr(model, "cfg", ModelConfig())
    icfg = InspectConfig(stride=stride, precision=precision, batch_size=batch_size)
    model = prepare_model(model, precision, next(model.parameters()).device)
    recon, _ = Reconstructor(model, cfg, icfg).run(to_chw(image))
    return from_chw(recon, image)


def tiles_for(height: int, width: int, patch: int = 128, stride: int = 30) -> int:
    """Number of windows the grid uses for an image of this size."""
    return TileGrid(max(height, patch), max(width, patch), patch, stride).__len__()


__all__ = ["Reconstructor", "reconstruct", "prepare_model", "precision_context", "to_chw", "from_chw",
           "tiles_for"]
