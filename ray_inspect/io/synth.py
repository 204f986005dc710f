"""Deterministic synthetic woven-fabric data sets in the MVTec AD layout, with pixel-accurate masks.

A texture is rendered as two sets of round threads (vertical warp, horizontal weft) crossing in a
weave pattern, with per-thread jitter, gentle waviness, fibre streaks, noise and uneven lighting.
Defects are drawn into a clean rendering; each changes exactly the pixels of its mask.
All lengths below are given for 512-pixel images and scale with the image size.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np
from scipy import ndimage
from skimage.draw import polygon as draw_polygon

from ray_inspect.config import SynthConfig
from ray_inspect.io import storage
from ray_inspect.io.images import encode_png, to_uint8

DEFECTS = ("cut", "rough", "contamination", "smooth")

GAP = 0.14          # brightness of the dark gaps between threads
FINE_NOISE = 0.012  # standard deviation of the sensor noise


@dataclass(frozen=True)
class Weave:
    """One texture: thread period at 512 px, pattern repeat in threads, and which thread lies on top."""

    period: float
    repeat: int
    warp_on_top: Callable[[np.ndarray, np.ndarray], np.ndarray]
    warp_level: float = 0.62
    weft_level: float = 0.52


WEAVES = {
    "plain": Weave(16.0, 2, lambda i, j: (i + j) % 2 == 0),
    "twill": Weave(14.0, 4, lambda i, j: (i + j) % 4 < 2),
    "basket": Weave(12.0, 4, lambda i, j: (i // 2 + j // 2) % 2 == 0),
}
TEXTURES = tuple(WEAVES)


class Rendered(NamedTuple):
    """One rendered image: the (possibly defective) image, its clean version, and the defect mask."""

    image: np.ndarray          # float32 (H, W) in [0, 1]
    clean: np.ndarray          # the same image before the defect was drawn
    mask: np.ndarray | None    # bool (H, W), None for good images


def check(cfg: SynthConfig) -> None:
    """Raise ValueError for an unknown texture or impossible sizes and counts."""
    if cfg.texture not in WEAVES:
        raise ValueError(f"unknown texture {cfg.texture!r}; choose one of {', '.join(TEXTURES)}")
    if cfg.size < 64:
        raise ValueError(f"size must be at least 64 pixels, not {cfg.size}")
    if min(cfg.train, cfg.validation, cfg.test_good, cfg.test_defective) < 0:
        raise ValueError("image counts must not be negative")
    if cfg.seed < 0:
        raise ValueError("seed must not be negative")


def plan(cfg: SynthConfig) -> list[tuple[str, int]]:
    """Groups (train/good, validation/good, test/good, test/<defect>) and counts; defects round-robin."""
    groups = [("train/good", cfg.train), ("validation/good", cfg.validation), ("test/good", cfg.test_good)]
    n = cfg.test_defective
    groups += [(f"test/{kind}", (n - t + len(DEFECTS) - 1) // len(DEFECTS)) for t, kind in enumerate(DEFECTS)]
    return groups


def rng_for(cfg: SynthConfig, group: str, index: int) -> np.random.Generator:
    """Generator seeded from (seed, texture, group, index): each image is independent of the others."""
    key = [cfg.seed, zlib.crc32(cfg.texture.encode()), zlib.crc32(group.encode()), index]
    return np.random.default_rng(np.random.SeedSequence(key))


# ----------------------------------------------------------------------------------------------
# Random fields and shapes


def smooth_noise(rng: np.random.Generator, size: int, corr: float) -> np.ndarray:
    """Smooth random field of unit standard deviation: random Gaussian bumps ~corr pixels apart."""
    corr = max(corr, 1.0)
    centres = np.arange(-2, size / corr + 3) * corr
    basis = np.exp(-0.5 * ((np.arange(size)[:, None] - centres[None, :]) / corr) ** 2)
    weights = rng.standard_normal((len(centres), len(centres)))
    field = np.einsum("il,jl->ij", basis @ weights, basis).astype(np.float32)  # einsum: no BLAS threads
    return (field - field.mean()) / (field.std() + 1e-6)


def filtered_noise(rng: np.random.Generator, size: int, sigma: tuple[float, float] | float) -> np.ndarray:
    """White noise blurred by a (possibly anisotropic) Gaussian, rescaled to unit standard deviation."""
    field = ndimage.gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), sigma)
    return field / (field.std() + 1e-6)


def blob(rng: np.random.Generator, size: int, radius: float, wobble: float) -> np.ndarray:
    """Bool mask of an irregular elliptic blob (wobbly radius) placed fully inside the image."""
    theta = np.linspace(0, 2 * np.pi, 96, endpoint=False)
    r = np.ones_like(theta)
    for k in range(2, 9):
        r += rng.uniform(0, wobble) / k * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    r = radius * np.clip(r, 0.35, None)
    aspect, angle = rng.uniform(0.6, 1.0), rng.uniform(0, np.pi)
    x, y = r * np.cos(theta), aspect * r * np.sin(theta)
    xs, ys = x * np.cos(angle) - y * np.sin(angle), x * np.sin(angle) + y * np.cos(angle)
    return place(rng, size, ys, xs)


def place(rng: np.random.Generator, size: int, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Rasterise a polygon given around the origin at a random position inside the image."""
    margin = 3
    cy = rng.uniform(margin - ys.min(), size - margin - ys.max())
    cx = rng.uniform(margin - xs.min(), size - margin - xs.max())
    mask = np.zeros((size, size), bool)
    rr, cc = draw_polygon(ys + cy, xs + cx, mask.shape)
    mask[rr, cc] = True
    if not mask.any():  # a degenerate polygon on a tiny image: keep at least its centre
        mask[int(cy), int(cx)] = True
    return mask


def alpha(mask: np.ndarray, feather: float = 1.5) -> np.ndarray:
    """Blend weight: 1 inside, falling towards the border, zero outside; never zero on the mask."""
    return np.clip(ndimage.distance_transform_edt(mask) / feather, 0, 1).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Texture


def texture(name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Render one random realisation of a woven texture as float32 (size, size) in [0, 1]."""
    weave, s = WEAVES[name], size / 512
    p = weave.period * s
    n = int(size / p) + weave.repeat + 8

    # thread coordinates: random phase, slow waviness (a smooth displacement field of ~1.5 px)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    u = (x + 1.5 * s * smooth_noise(rng, size, 90 * s)) / p + rng.uniform(0, weave.repeat) + 2
    v = (y + 1.5 * s * smooth_noise(rng, size, 90 * s)) / p + rng.uniform(0, weave.repeat) + 2
    i, j = u.astype(np.int64), v.astype(np.int64)
    fu, fv = u - i, v - j

    # per-thread jitter: width and lateral offset (fractions of the period), brightness
    def threads() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        width = np.clip(rng.normal(0.80, 0.05, n), 0.65, 0.9)
        offset = np.clip(rng.normal(0.0, 0.025, n), -0.04, 0.04)
        bright = rng.normal(1.0, 0.05, n)
        return width, offset, bright

    w_width, w_off, w_bright = threads()
    f_width, f_off, f_bright = threads()
    # round threads: half-ellipse cross-section; the thread on top bulges, the one below sinks
    warp = np.sqrt(np.clip(1 - ((fu - 0.5 - w_off[i]) / (w_width[i] / 2)) ** 2, 0, 1))
    weft = np.sqrt(np.clip(1 - ((fv - 0.5 - f_off[j]) / (f_width[j] / 2)) ** 2, 0, 1))
    top = weave.warp_on_top(i, j)
    warp *= np.where(top, 0.75 + 0.25 * np.sin(np.pi * fv), 0.5)
    weft *= np.where(top, 0.5, 0.75 + 0.25 * np.sin(np.pi * fu))

    # the higher thread is visible; fibre streaks run along each thread
    show_warp = warp >= weft
    height = np.maximum(warp, weft)
    level = np.where(show_warp, weave.warp_level * w_bright[i], weave.weft_level * f_bright[j])
    fibres = np.where(show_warp, filtered_noise(rng, size, (6 * s, 0.6 * s)),
                      filtered_noise(rng, size, (0.6 * s, 6 * s)))
    img = GAP + (level * (1 + 0.05 * fibres) - GAP) * height ** 0.8

    # optics and lighting: slight blur, a smooth illumination gradient, sensor noise
    img = ndimage.gaussian_filter(img, 0.7 * s)
    gy, gx = rng.normal(0, 0.06, 2)
    light = 1 + gx * (x / size - 0.5) + gy * (y / size - 0.5) + 0.03 * smooth_noise(rng, size, 160 * s)
    img = img * light * rng.uniform(0.95, 1.05) + FINE_NOISE * rng.standard_normal((size, size))
    return np.clip(img, 0, 1).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Defects: each returns the defective image and the mask of the pixels it changed


def cut(img: np.ndarray, rng: np.random.Generator, weave: Weave) -> tuple[np.ndarray, np.ndarray]:
    """A broken thread or slit: a dark (or bright) ragged line 4-7 px wide and 40-110 px long."""
    size, s = img.shape[0], img.shape[0] / 512
    length, width = rng.uniform(40, 110) * s, max(rng.uniform(4, 7) * s, 2.0)
    if rng.random() < 0.5:  # along the threads
        angle = rng.choice([0.0, np.pi / 2]) + rng.normal(0, 0.03)
    else:
        angle = rng.uniform(0, np.pi)
    t = np.linspace(-length / 2, length / 2, 16)
    half = width / 2 * np.clip(1 + 0.2 * rng.standard_normal(16), 0.6, 1.5)
    half[[0, -1]] *= 0.5  # ragged, narrower ends
    d, nrm = np.array([np.sin(angle), np.cos(angle)]), np.array([np.cos(angle), -np.sin(angle)])
    side_a = t[:, None] * d + half[:, None] * nrm
    side_b = t[:, None] * d - half[:, None] * nrm
    pts = np.concatenate([side_a, side_b[::-1]])
    mask = place(rng, size, pts[:, 0], pts[:, 1])
    value = rng.uniform(0.04, 0.12) if rng.random() < 0.7 else rng.uniform(0.85, 0.95)
    fill = value + 0.02 * rng.standard_normal(img.shape)
    a = alpha(mask)
    return img * (1 - a) + fill * a, mask


def rough(img: np.ndarray, rng: np.random.Generator, weave: Weave) -> tuple[np.ndarray, np.ndarray]:
    """A roughened area 30-80 px across: the weave locally torn apart, with strong grainy noise."""
    size, s = img.shape[0], img.shape[0] / 512
    mask = blob(rng, size, rng.uniform(16, 40) * s, 0.5)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    dy, dx = (6 * s * filtered_noise(rng, size, 2.5 * s) for _ in range(2))
    torn = ndimage.map_coordinates(img, [y + dy, x + dx], order=1, mode="reflect")
    grain = 0.1 * filtered_noise(rng, size, 1.0 * s)
    a = alpha(mask)
    return img * (1 - a) + (torn + grain) * a, mask


def contamination(img: np.ndarray, rng: np.random.Generator, weave: Weave) -> tuple[np.ndarray, np.ndarray]:
    """A stain 20-70 px across with an irregular boundary, darker (oil) or brighter (lint) than the fabric."""
    size, s = img.shape[0], img.shape[0] / 512
    mask = blob(rng, size, rng.uniform(14, 35) * s, 0.8)
    opacity = np.clip(0.8 + 0.15 * smooth_noise(rng, size, 12 * s), 0.5, 1.0)
    oil = rng.random() < 0.6
    stained = img * rng.uniform(0.35, 0.6) if oil else 0.35 * img + rng.uniform(0.55, 0.65)
    a = alpha(mask) * opacity
    return img * (1 - a) + stained * a, mask


def smooth(img: np.ndarray, rng: np.random.Generator, weave: Weave) -> tuple[np.ndarray, np.ndarray]:
    """A region 40-80 px across with the weave replaced by its local mean: structure lost, brightness kept."""
    size, s = img.shape[0], img.shape[0] / 512
    mask = blob(rng, size, rng.uniform(20, 40) * s, 0.2)
    box = max(int(round(weave.repeat * weave.period * s)), 1)  # one full pattern repeat
    mean = ndimage.gaussian_filter(ndimage.uniform_filter(img, box, mode="reflect"), weave.period * s / 2)
    flat = mean + FINE_NOISE * rng.standard_normal(img.shape)
    a = alpha(mask)
    return img * (1 - a) + flat * a, mask


DEFECT_FUNCTIONS = {"cut": cut, "rough": rough, "contamination": contamination, "smooth": smooth}


# ----------------------------------------------------------------------------------------------
# Data set


def render(cfg: SynthConfig, group: str, index: int) -> Rendered:
    """Image number `index` of a group (see plan), deterministically."""
    check(cfg)
    tex_rng, defect_rng = rng_for(cfg, group, index).spawn(2)
    clean = texture(cfg.texture, cfg.size, tex_rng)
    kind = group.split("/", 1)[1]
    if kind == "good":
        return Rendered(clean, clean, None)
    if kind not in DEFECT_FUNCTIONS:
        raise ValueError(f"unknown defect type {kind!r}; choose one of {', '.join(DEFECTS)}")
    image, mask = DEFECT_FUNCTIONS[kind](clean, defect_rng, WEAVES[cfg.texture])
    return Rendered(np.clip(image, 0, 1).astype(np.float32), clean, mask)


def generate(out: str, cfg: SynthConfig, progress: Callable[[int], object] | None = None) -> dict:
    """Write the data set under `out` (path or fsspec URL), call progress(1) per image; return a summary."""
    check(cfg)
    counts = {}
    for group, count in plan(cfg):
        counts[group] = count
        kind = group.split("/", 1)[1]
        for index in range(count):
            rendered = render(cfg, group, index)
            name = f"{index:03d}"
            storage.write_bytes(storage.join(out, *group.split("/"), f"{name}.png"),
                                encode_png(to_uint8(rendered.image)))
            if rendered.mask is not None:
                storage.write_bytes(storage.join(out, "ground_truth", kind, f"{name}_mask.png"),
                                    encode_png(rendered.mask.astype(np.uint8) * 255))
            if progress is not None:
                progress(1)
    return {
        "texture": cfg.texture,
        "size": cfg.size,
        "seed": cfg.seed,
        "out": out,
        "counts": counts,
        "images": sum(counts.values()),
        "masks": cfg.test_defective,
    }
