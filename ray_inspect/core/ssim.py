"""SSIM maps on batches of torch tensors: one implementation for the training loss and the residuals.

Matches ``skimage.metrics.structural_similarity(a, b, data_range=1, gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, full=True)``, borders included (same symmetric padding as scipy's
``mode='reflect'``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
import torch

from ray_inspect.config import SSIMConfig


@dataclass(frozen=True)
class SSIMMaps:
    """Per-pixel SSIM and its luminance, contrast and structure terms, each shaped like the input."""

    ssim: torch.Tensor
    luminance: torch.Tensor
    contrast: torch.Tensor
    structure: torch.Tensor


@lru_cache(maxsize=16)
def _kernel_cpu(window: int, sigma: float) -> torch.Tensor:
    r = window // 2
    x = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


def gaussian_kernel(window: int, sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Normalised 1-D Gaussian of odd length ``window``."""
    if window % 2 != 1 or window < 3:
        raise ValueError(f"SSIM window must be odd and >= 3, not {window}")
    return _kernel_cpu(window, float(sigma)).to(device=device, dtype=dtype)


def _pad_symmetric(x: torch.Tensor, r: int) -> torch.Tensor:
    """Pad H and W by ``r`` mirroring the edge pixel too (scipy 'reflect', numpy 'symmetric')."""
    x = torch.cat([x[..., :r].flip(-1), x, x[..., -r:].flip(-1)], dim=-1)
    return torch.cat([x[..., :r, :].flip(-2), x, x[..., -r:, :].flip(-2)], dim=-2)


# Elements per block of the CPU blur. Inference: small enough to stay in the L2 cache (whole-image
# passes are memory-bound at 11 taps). Training: larger blocks, since the many small batched planes
# would otherwise mean thousands of tiny autograd ops.
_CPU_BLOCK = 1 << 18
_CPU_BLOCK_GRAD = 1 << 22

# Centre of the [0, 1] data range; a constant keeps results independent of how an image is cut.
_SHIFT = 0.5


def _correlate_valid(xp: torch.Tensor, k: list[float], h: int, w: int,
                     block: int = _CPU_BLOCK) -> torch.Tensor:
    """Valid separable correlation of (M, h+2r, w+2r) planes with ``k``: shift-and-add in
    cache-sized blocks of planes and rows."""
    m, hp, wp = xp.shape
    r = len(k) // 2
    block = block if xp.device.type == "cpu" else 1 << 40
    planes = max(1, block // (hp * wp))
    rows = h if planes > 1 else max(8, block // wp)
    chunks = []
    for p0 in range(0, m, planes):
        strips = []
        for s in range(0, h, rows):
            e = min(h, s + rows)
            blk = xp[p0 : p0 + planes, s : e + 2 * r]
            horiz = blk[..., 0:w] * k[0]
            for i in range(1, len(k)):
                horiz.add_(blk[..., i : i + w], alpha=k[i])
            out = horiz[:, 0 : e - s] * k[0]
            for i in range(1, len(k)):
                out.add_(horiz[:, i : i + e - s], alpha=k[i])
            strips.append(out)
        chunks.append(strips[0] if len(strips) == 1 else torch.cat(strips, dim=1))
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=0)


def _fold_symmetric(p: torch.Tensor, r: int) -> torch.Tensor:
    """Adjoint of symmetric padding by ``r`` on the last two axes: fold the margins back in."""
    for dim in (-1, -2):
        n = p.shape[dim] - 2 * r
        core = p.narrow(dim, r, n).clone()
        core.narrow(dim, 0, r).add_(p.narrow(dim, 0, r).flip(dim))
        core.narrow(dim, n - r, r).add_(p.narrow(dim, n + r, r).flip(dim))
        p = core
    return p


class _GaussianBlur(torch.autograd.Function):
    """Blur with a hand-written backward: the adjoint of (symmetric pad, correlate) is
    (zero-pad, correlate with the same symmetric kernel, fold the margins), as fast as the forward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, k: list[float]):
        n, c, h, w = x.shape
        r = len(k) // 2
        ctx.k = k
        xp = _pad_symmetric(x, r).reshape(n * c, h + 2 * r, w + 2 * r)
        block = _CPU_BLOCK_GRAD if ctx.needs_input_grad[0] else _CPU_BLOCK
        return _correlate_valid(xp, k, h, w, block).view(n, c, h, w)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        k = ctx.k
        r = len(k) // 2
        n, c, h, w = g.shape
        gp = torch.nn.functional.pad(g.reshape(n * c, h, w), (2 * r,) * 4)
        pbar = _correlate_valid(gp, k, h + 2 * r, w + 2 * r, _CPU_BLOCK_GRAD)
        return _fold_symmetric(pbar, r).view(n, c, h, w), None


def gaussian_blur(x: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Separable Gaussian filter of (N, C, H, W) with symmetric borders; output same shape."""
    r = window // 2
    if x.shape[-2] <= r or x.shape[-1] <= r:
        raise ValueError(f"image of {x.shape[-2]}x{x.shape[-1]} is too small for an SSIM window of {window}")
    gaussian_kernel(window, sigma, x.dtype, x.device)  # validates the window
    return _GaussianBlur.apply(x, _kernel_cpu(window, float(sigma)).tolist())


def _moments(x: torch.Tensor, y: torch.Tensor, window: int, sigma: float):
    """Local means, variances and covariance; second moments are taken about mid-range (a
    constant, so every pixel depends on its neighbourhood only) to limit float32 cancellation."""
    shift = _SHIFT
    xs, ys = x - shift, y - shift
    c = x.shape[1]
    stacked = torch.cat([xs, ys, xs * xs, ys * ys, xs * ys], dim=1)
    m = gaussian_blur(stacked, window, sigma)
    mx, my, mxx, myy, mxy = torch.split(m, c, dim=1)
    vx = mxx - mx * mx
    vy = myy - my * my
    vxy = mxy - mx * my
    return mx + shift, my + shift, vx, vy, vxy


def _prepare(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.shape != y.shape:
        raise ValueError(f"SSIM inputs differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.dim() != 4:
        raise ValueError(f"SSIM expects (N, C, H, W) tensors, got {x.dim()} dimensions")
    dtype = torch.float64 if torch.float64 in (x.dtype, y.dtype) else torch.float32
    return x.to(dtype), y.to(dtype)


def _combine(mx, my, vx, vy, vxy, c1: float, c2: float) -> torch.Tensor:
    return (2 * mx * my + c1) * (2 * vxy + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2))


def _strip_rows() -> int:
    """Rows per strip of the no-grad CPU path, so that a strip's five moment planes stay in the
    cache (measured, 1024 px wide)."""
    return 64


def _cv2():
    """OpenCV, with as many threads as torch (an actor's CPU share)."""
    import cv2

    if cv2.getNumThreads() != torch.get_num_threads():
        cv2.setNumThreads(torch.get_num_threads())
    return cv2


def _ssim_strips(x: torch.Tensor, y: torch.Tensor, cfg: SSIMConfig, c1: float, c2: float) -> torch.Tensor:
    """Inference path on CPU: pad once, then per strip of rows blur the five moment planes with
    OpenCV's vectorised separable filter (quicker than our shift-and-add) and combine them with
    OpenCV's fused arithmetic (a*p + b*q + c in one pass), in place and in the cache. Every
    pixel's arithmetic depends on its neighbourhood only, as in the torch path."""
    cv2 = _cv2()
    n, c, h, w = x.shape
    r = cfg.window // 2
    s = _SHIFT
    k = _kernel_cpu(cfg.window, float(cfg.sigma)).numpy().astype(x.numpy().dtype)
    out = torch.empty_like(x)
    rows = _strip_rows()
    hp, wp = min(h, rows) + 2 * r, w + 2 * r
    prod = np.empty((3, hp, wp), k.dtype)            # x^2, y^2, xy of a strip
    blur = np.empty((5, hp, wp), k.dtype)            # the blurred planes (valid part used)
    tmp = np.empty((2, min(h, rows), w), k.dtype)
    for b in range(n):
        for ch in range(c):
            # symmetric padding (OpenCV's BORDER_REFLECT), shifted by the constant
            xp, yp = (cv2.copyMakeBorder(t[b, ch].numpy(), r, r, r, r, cv2.BORDER_REFLECT) for t in (x, y))
            xp -= s
            yp -= s
            o = out[b, ch].numpy()
            for a in range(0, h, rows):
                e = min(h, a + rows)
                m, hh = e - a, e - a + 2 * r
                xs, ys = xp[a : a + hh], yp[a : a + hh]
                cv2.multiply(xs, xs, dst=prod[0, :hh])
                cv2.multiply(ys, ys, dst=prod[1, :hh])
                cv2.multiply(xs, ys, dst=prod[2, :hh])
                for i, plane in enumerate((xs, ys, prod[0, :hh], prod[1, :hh], prod[2, :hh])):
                    cv2.sepFilter2D(plane, -1, k, k, dst=blur[i, :hh], borderType=cv2.BORDER_CONSTANT)
                mx, my, mxx, myy, mxy = blur[:, r : r + m, r : r + w]     # means of shifted values
                p, q = tmp[:, :m]
                cv2.multiply(mx, my, dst=p)
                # constants are added last (beside ~0.25 terms they would lose their digits), with
                # addWeighted(x, 1, x, 0, c): quicker than numpy's += on these strided views
                cv2.addWeighted(mxy, 2, p, -2, 0, dst=mxy)
                cv2.addWeighted(mxy, 1, mxy, 0, c2, dst=mxy)               # 2 cov + c2
                cv2.multiply(mx, mx, dst=q)
                cv2.accumulateSquare(my, q)
                cv2.add(mxx, myy, dst=mxx)
                cv2.subtract(mxx, q, dst=mxx)
                cv2.addWeighted(mxx, 1, mxx, 0, c2, dst=mxx)               # vx + vy + c2
                cv2.addWeighted(mx, 1, mx, 0, s, dst=mx)                   # the means themselves
                cv2.addWeighted(my, 1, my, 0, s, dst=my)
                cv2.multiply(mx, my, dst=p, scale=2)
                cv2.addWeighted(p, 1, p, 0, c1, dst=p)                     # 2 ux uy + c1
                cv2.multiply(mx, mx, dst=q)
                cv2.accumulateSquare(my, q)
                cv2.addWeighted(q, 1, q, 0, c1, dst=q)                     # ux^2 + uy^2 + c1
                cv2.multiply(p, mxy, dst=p)
                cv2.multiply(q, mxx, dst=q)
                cv2.divide(p, q, dst=o[a:e])
    return out


def ssim_map(x: torch.Tensor, y: torch.Tensor, cfg: SSIMConfig = SSIMConfig()) -> torch.Tensor:
    """SSIM map alone (alpha = beta = gamma = 1), the fast path for the loss and the residual."""
    if (cfg.alpha, cfg.beta, cfg.gamma) != (1.0, 1.0, 1.0):
        return ssim_maps(x, y, cfg=cfg).ssim
    with torch.autocast(device_type=x.device.type, enabled=False):
        x, y = _prepare(x, y)
        c1 = (cfg.k1 * cfg.data_range) ** 2
        c2 = (cfg.k2 * cfg.data_range) ** 2
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or y.requires_grad)
        if x.device.type == "cpu" and not needs_grad:
            return _ssim_strips(x.contiguous(), y.contiguous(), cfg, c1, c2)
        return _combine(*_moments(x, y, cfg.window, cfg.sigma), c1, c2)


def ssim_maps(
    x: torch.Tensor,
    y: torch.Tensor,
    window: int | None = None,
    sigma: float | None = None,
    cfg: SSIMConfig = SSIMConfig(),
) -> SSIMMaps:
    """SSIM, luminance, contrast and structure maps of (N, C, H, W) tensors with values in [0, data_range].

    SSIM = l^alpha * c^beta * s^gamma; a fractional gamma keeps the sign of the structure term.
    """
    if window is not None or sigma is not None:
        cfg = replace(cfg, window=window if window is not None else cfg.window,
                      sigma=sigma if sigma is not None else cfg.sigma)
    with torch.autocast(device_type=x.device.type, enabled=False):
        x, y = _prepare(x, y)
        c1 = (cfg.k1 * cfg.data_range) ** 2
        c2 = (cfg.k2 * cfg.data_range) ** 2
        c3 = c2 / 2
        mx, my, vx, vy, vxy = _moments(x, y, cfg.window, cfg.sigma)
        sx, sy = vx.clamp_min(0).sqrt(), vy.clamp_min(0).sqrt()
        lum = (2 * mx * my + c1) / (mx * mx + my * my + c1)
        con = (2 * sx * sy + c2) / (vx + vy + c2)
        struct = (vxy + c3) / (sx * sy + c3)
        if (cfg.alpha, cfg.beta, cfg.gamma) == (1.0, 1.0, 1.0):
            s = (2 * mx * my + c1) * (2 * vxy + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2))
        else:
            s = lum.clamp_min(0) ** cfg.alpha * con.clamp_min(0) ** cfg.beta
            s = s * struct.sign() * struct.abs() ** cfg.gamma
        return SSIMMaps(ssim=s, luminance=lum, contrast=con, structure=struct)


def ssim_loss(x: torch.Tensor, y: torch.Tensor, cfg: SSIMConfig = SSIMConfig()) -> torch.Tensor:
    """1 - mean SSIM over the batch (the SSIM-AE training loss), computed in float32."""
    return 1.0 - ssim_map(x, y, cfg).mean()
