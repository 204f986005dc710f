"""Synthetic defects pasted into defect-free training patches (DRAEM's reconstructive training).

Trained to map a patch with a pasted defect back to the clean patch, the autoencoder learns to
remove what does not belong to the surface instead of copying it, so a real defect leaves a
residual however well the network reconstructs normal texture. Two shapes: smooth blobs
(thresholded low-frequency noise, as DRAEM's Perlin masks) and thin polylines (cracks,
scratches); filled with another patch of the batch turned and re-contrasted, or the patch itself
made darker or brighter, blended at a random opacity. Works on uint8 (N, C, H, W) batches.
"""

from __future__ import annotations

import cv2
import numpy as np


def paste_defects(batch: np.ndarray, probability: float, rng: np.random.Generator) -> np.ndarray:
    """A copy of ``batch`` in which each patch carries a synthetic defect with ``probability``."""
    out = batch.copy()
    if probability <= 0:
        return out
    h, w = batch.shape[-2:]
    for i in np.flatnonzero(rng.random(len(batch)) < probability):
        mask = blob_mask(h, w, rng) if rng.random() < 0.5 else line_mask(h, w, rng)
        fill = _fill(batch, int(i), rng).astype(np.float32)
        alpha = mask * rng.uniform(0.3, 1.0)
        out[i] = np.clip(batch[i] * (1 - alpha) + fill * alpha + 0.5, 0, 255).astype(np.uint8)
    return out


def blob_mask(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """One or more smooth blobs covering 0.5-10 % of the patch, with soft (1-2 px) edges."""
    grid = int(rng.integers(2, 9))
    noise = cv2.resize(rng.standard_normal((grid, grid)).astype(np.float32), (w, h),
                       interpolation=cv2.INTER_CUBIC)
    area = rng.uniform(0.005, 0.10)
    mask = (noise > np.quantile(noise, 1 - area)).astype(np.float32)
    return cv2.GaussianBlur(mask, (0, 0), 0.8)


def line_mask(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A random-walk polyline 1-3 px wide and 15-90 px long: a crack or a scratch."""
    point = rng.uniform([0.2 * w, 0.2 * h], [0.8 * w, 0.8 * h])
    angle = rng.uniform(0, 2 * np.pi)
    points = [point]
    for _ in range(int(rng.integers(1, 6))):
        angle += rng.normal(0, 0.5)
        point = point + rng.uniform(15, 30) * np.array([np.cos(angle), np.sin(angle)])
        points.append(point)
    mask = np.zeros((h, w), np.float32)
    cv2.polylines(mask, [np.round(np.array(points)).astype(np.int32)], False, 1.0,
                  thickness=int(rng.integers(1, 4)), lineType=cv2.LINE_AA)
    return mask


def _fill(batch: np.ndarray, i: int, rng: np.random.Generator) -> np.ndarray:
    """What the defect shows: another patch turned and re-contrasted, or this one shifted in grey."""
    patch = batch[i].astype(np.float32)
    if rng.random() < 0.5 and len(batch) > 1:
        j = int(rng.integers(len(batch) - 1))
        other = np.rot90(batch[j + (j >= i)], int(rng.integers(4)), axes=(-2, -1)).astype(np.float32)
        return (other - other.mean()) * rng.uniform(0.5, 2.0) + rng.uniform(0, 255)
    return patch + rng.choice([-1, 1]) * rng.uniform(40, 160)
