"""Residual -> anomaly score: the paper thresholds 1 - SSIM as is; three options make it fit real data.

Smoothing averages the residual over a defect-sized neighbourhood, so a crack's coherent residual
rises above the speckle a stochastic texture leaves everywhere. Position normalisation divides out
what defect-free images leave at each position (aligned parts: edges, printing, fixtures), as a
z-score against statistics learned by calibration. Feature normalisation scores each pixel by how
unlikely its local structure (Gaussian-derivative responses of the image at four scales, and the
residual) is under a Gaussian fitted to defect-free images: a texture's normal variation, however
strong, is expected; a crack's line is not. Contrast adaptation lets each image's own spread of
those responses (a coarser or a smoother item, a brighter lamp) move the Gaussian part of the way
towards it. All work on bands of rows exactly as on the whole map (the band's halo covers the
filters' radius).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ray_inspect.config import Z_MAX, ScoreConfig

JET_SCALES = (1.0, 2.0, 4.0, 8.0)   # Gaussian-derivative scales of the feature normalisation (px)
RESIDUAL_SIGMA = 2.0                 # the residual enters the features smoothed at this sigma
N_FEATURES = 3 * len(JET_SCALES) + 1
N_IMAGE_FEATURES = N_FEATURES - 1    # all but the residual
CONTRAST_STRIDE = 4                  # an image's contrast is measured on every 4th pixel of every 4th row
CONTRAST_RATIO = (0.1, 10.0)         # an image's contrast over the calibration images' is clipped to this


def smoothing_radius(sigma: float) -> int:
    """Half-width of the Gaussian kernel: 4 sigma, as scipy.ndimage truncates it."""
    return int(4.0 * sigma + 0.5) if sigma > 0 else 0


def gaussian_kernel(sigma: float, order: int = 0) -> np.ndarray:
    """Correlation weights of a Gaussian (``order`` 0) or its derivative (1, 2), as
    scipy.ndimage.gaussian_filter1d applies them."""
    r = smoothing_radius(sigma)
    x = np.arange(-r, r + 1, dtype=np.float64)
    phi = np.exp(-0.5 * (x / sigma) ** 2)
    phi /= phi.sum()
    poly = {0: 1.0, 1: x / sigma**2, 2: x**2 / sigma**4 - 1.0 / sigma**2}[order]
    return (poly * phi).astype(np.float32)   # order 1 is mirrored: correlation, not convolution


def _separable(src: np.ndarray, ky: np.ndarray, kx: np.ndarray) -> np.ndarray:
    """Separable correlation with mirrored borders (scipy.ndimage's mode 'reflect')."""
    import cv2

    r = max(len(ky), len(kx)) // 2
    src = np.ascontiguousarray(src, dtype=np.float32)
    if min(src.shape) <= r:      # OpenCV mirrors one reflection only; pad like numpy's 'symmetric'
        pad = np.pad(src, r, mode="symmetric")
        return cv2.sepFilter2D(pad, cv2.CV_32F, kx, ky, borderType=cv2.BORDER_REFLECT)[r:-r, r:-r]
    return cv2.sepFilter2D(src, cv2.CV_32F, kx, ky, borderType=cv2.BORDER_REFLECT)


def smooth(residual: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing with mirrored borders (= scipy.ndimage.gaussian_filter, mode 'reflect')."""
    if sigma <= 0:
        return residual
    k = gaussian_kernel(sigma)
    return _separable(residual, k, k)


def local_features(image: np.ndarray, residual: np.ndarray) -> np.ndarray:
    """(H, W, N_FEATURES): at each scale the two Hessian eigenvalues (times sigma^2) and the
    gradient magnitude (times sigma) of the (H, W) image, then the residual smoothed at
    RESIDUAL_SIGMA. Scale-normalised, so a line scores alike at every scale it fits."""
    out = np.empty((*image.shape, N_FEATURES), np.float32)
    for i, s in enumerate(JET_SCALES):
        g0, g1, g2 = (gaussian_kernel(s, k) for k in (0, 1, 2))
        _jet(out[..., 3 * i : 3 * i + 3], s, _separable(image, g2, g0), _separable(image, g0, g2),
             _separable(image, g1, g1), _separable(image, g1, g0), _separable(image, g0, g1))
    out[..., -1] = smooth(residual, RESIDUAL_SIGMA)
    return out


def _jet(out: np.ndarray, s: float, hyy: np.ndarray, hxx: np.ndarray, hxy: np.ndarray,  # noqa: PLR0913 - the five derivatives
         gy: np.ndarray, gx: np.ndarray) -> None:
    """Write one scale's three features into ``out`` (..., 3): the Hessian's larger and smaller
    eigenvalue times s^2, the gradient magnitude times s."""
    half_trace = 0.5 * (hxx + hyy)
    spread = np.sqrt(0.25 * (hxx - hyy) ** 2 + hxy**2)
    out[..., 0] = s * s * (half_trace + spread)
    out[..., 1] = s * s * (half_trace - spread)
    out[..., 2] = s * np.hypot(gy, gx)


FEATURE_HALO = smoothing_radius(max(*JET_SCALES, RESIDUAL_SIGMA))


def image_feature_samples(image: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """``local_features(image, ...)[ys][:, xs]`` without the residual: (len(ys), len(xs),
    N_IMAGE_FEATURES). Filters along x only the rows it keeps, so sparse rows cost far less."""
    one = np.ones(1, np.float32)

    def along_x(rows: np.ndarray, k: np.ndarray) -> np.ndarray:
        return _separable(rows, one, k)[:, xs]

    out = np.empty((len(ys), len(xs), N_IMAGE_FEATURES), np.float32)
    for i, s in enumerate(JET_SCALES):
        g0, g1, g2 = (gaussian_kernel(s, k) for k in (0, 1, 2))
        y0, y1, y2 = (_separable(image, g, one)[ys] for g in (g0, g1, g2))    # filtered along y
        _jet(out[..., 3 * i : 3 * i + 3], s, along_x(y2, g0), along_x(y0, g2), along_x(y1, g1),
             along_x(y1, g0), along_x(y0, g1))
    return out


def image_contrast(grey_rows: Callable[[int, int], np.ndarray], height: int, width: int,
                   chunk_pixels: int = 1 << 20) -> np.ndarray:
    """The image's spread of each image feature: 1.4826 x the median absolute deviation over a grid
    of every CONTRAST_STRIDE-th pixel (robust to a defect covering part of it). ``grey_rows(a, b)``
    gives rows [a, b) of the grey image, so a large image is read a block at a time."""
    xs = np.arange(CONTRAST_STRIDE // 2, width, CONTRAST_STRIDE)
    ys = np.arange(CONTRAST_STRIDE // 2, height, CONTRAST_STRIDE)
    step = max(4 * FEATURE_HALO, chunk_pixels // max(width, 1))   # the halo adds at most half
    samples = []
    for r0 in range(0, height, step):
        picked = ys[(ys >= r0) & (ys < r0 + step)]
        if len(picked):
            c0, c1 = max(0, r0 - FEATURE_HALO), min(height, r0 + step + FEATURE_HALO)
            block = np.asarray(grey_rows(c0, c1), np.float32)
            samples.append(image_feature_samples(block, picked - c0, xs).reshape(-1, N_IMAGE_FEATURES))
    if not samples:
        raise ValueError(f"a {width}x{height} image is too small to measure its contrast")
    f = np.ascontiguousarray(np.concatenate(samples).T, np.float64)        # (N_IMAGE_FEATURES, samples)
    return 1.4826 * np.median(np.abs(f - np.median(f, axis=1, keepdims=True)), axis=1)


def contrast_of(image: np.ndarray) -> np.ndarray:
    """``image_contrast`` of a grey image held in memory."""
    return image_contrast(lambda a, b: image[a:b], *image.shape)


def feature_blocks(image: np.ndarray, residual: np.ndarray, chunk_pixels: int = 1 << 20):
    """Yield ((r0, r1), ``local_features`` of rows [r0, r1)), each block computed with FEATURE_HALO
    rows of context, so memory stays at ``chunk_pixels`` x N_FEATURES whatever the image's size and
    the blocks equal the whole computation's rows."""
    h, w = residual.shape
    step = max(1, chunk_pixels // max(w, 1))
    for r0 in range(0, h, step):
        r1 = min(h, r0 + step)
        c0, c1 = max(0, r0 - FEATURE_HALO), min(h, r1 + FEATURE_HALO)
        yield (r0, r1), local_features(image[c0:c1], residual[c0:c1])[r0 - c0 : r1 - c0]


def _linear_weights(n_out: int, n_in: int, start: int, stop: int) -> tuple[np.ndarray, ...]:
    """Source indices and weights of output rows [start, stop) of a linear resize n_in -> n_out
    (pixel centres aligned, as skimage's order-1 resize)."""
    pos = (np.arange(start, stop) + 0.5) * (n_in / n_out) - 0.5
    pos = np.clip(pos, 0, n_in - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, (pos - lo).astype(np.float32)


def resample_rows(grid: np.ndarray, shape: tuple[int, int], rows: tuple[int, int]) -> np.ndarray:
    """Rows [r0, r1) of ``grid`` linearly resampled to ``shape``, without building the whole map."""
    (h, w), (r0, r1) = shape, rows
    ylo, yhi, fy = _linear_weights(h, grid.shape[0], r0, r1)
    xlo, xhi, fx = _linear_weights(w, grid.shape[1], 0, w)
    top = grid[ylo] * (1 - fy[:, None]) + grid[yhi] * fy[:, None]
    return top[:, xlo] * (1 - fx) + top[:, xhi] * fx


@dataclass(frozen=True)
class PositionStats:
    """Mean and spread of the defect-free score at each position, on a reference grid that is
    resampled to each image's processing shape."""

    mean: np.ndarray   # (h, w) float32
    std: np.ndarray    # (h, w) float32, floored (see ``fit``)

    @classmethod
    def fit(cls, maps: list[np.ndarray], floor: float = 0.1) -> PositionStats:
        """Statistics of defect-free maps, each resampled to the first map's shape; the spread is
        floored at ``floor`` times its median, so a position that never varied does not explode."""
        shape = maps[0].shape
        total = np.zeros(shape, np.float64)
        squares = np.zeros(shape, np.float64)
        for m in maps:
            m = m if m.shape == shape else resample_rows(m, shape, (0, shape[0]))
            total += m
            squares += np.square(m, dtype=np.float64)
        mean = total / len(maps)
        std = np.sqrt(np.maximum(squares / len(maps) - mean**2, 0.0))
        std = np.maximum(std, floor * max(float(np.median(std)), 1e-6))
        return cls(mean.astype(np.float32), std.astype(np.float32))

    def rows(self, shape: tuple[int, int], rows: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        if self.mean.shape == shape:
            return self.mean[rows[0] : rows[1]], self.std[rows[0] : rows[1]]
        return resample_rows(self.mean, shape, rows), resample_rows(self.std, shape, rows)


@dataclass(frozen=True)
class FeatureStats:
    """A Gaussian of defect-free pixels' ``local_features``: their mean and the whitening matrix
    (the inverse Cholesky factor of their covariance), so the score is a Mahalanobis distance.

    With contrast adaptation (``adapt`` > 0) every image's features are first divided by
    (its ``image_contrast`` / ``reference``) ** adapt, ``reference`` being the calibration
    images' median contrast: 0 keeps one Gaussian for all, 1 rescales each image to the reference."""

    mean: np.ndarray     # (N_FEATURES,) float64
    whiten: np.ndarray   # (N_FEATURES, N_FEATURES) float64, lower triangular
    adapt: float = 0.0
    reference: np.ndarray | None = None   # (N_IMAGE_FEATURES,) float64, with adapt > 0

    def __post_init__(self) -> None:
        if self.adapt > 0 and (self.reference is None or np.shape(self.reference) != (N_IMAGE_FEATURES,)):
            raise ValueError(f"contrast adaptation needs {N_IMAGE_FEATURES} reference spreads")

    @classmethod
    def fit(cls, images: list[np.ndarray], residuals: list[np.ndarray], adapt: float = 0.0,
            contrasts: list[np.ndarray] | None = None) -> FeatureStats:
        """Exact mean and covariance over every pixel of the defect-free images (float64 sums per
        image, rescaled by each image's adaptation; ``contrasts`` are the images' ``contrast_of``
        where the caller has them); a ridge of 1e-6 of the mean variance keeps a feature that never
        varied invertible."""
        if adapt > 0 and contrasts is None:
            contrasts = [contrast_of(image) for image in images]
        reference = np.maximum(np.median(contrasts, axis=0), 1e-12) if adapt > 0 else None
        n, total, outer = 0, np.zeros(N_FEATURES), np.zeros((N_FEATURES, N_FEATURES))
        for i, (image, residual) in enumerate(zip(images, residuals, strict=True)):
            t, o = np.zeros(N_FEATURES), np.zeros((N_FEATURES, N_FEATURES))
            for _, block in feature_blocks(image, residual):
                f = block.reshape(-1, N_FEATURES).astype(np.float64)
                n, t, o = n + len(f), t + f.sum(0), o + f.T @ f
            a = _factors(contrasts[i], reference, adapt).astype(float) if adapt > 0 else np.ones(N_FEATURES)
            total, outer = total + a * t, outer + o * np.outer(a, a)
        mean = total / n
        cov = outer / n - np.outer(mean, mean)
        cov += np.eye(N_FEATURES) * max(1e-6 * float(np.trace(cov)) / N_FEATURES, 1e-12)
        return cls(mean, np.linalg.inv(np.linalg.cholesky(cov)), adapt, reference)

    def factors(self, contrast: np.ndarray | None) -> np.ndarray | None:
        """What one image's features are multiplied by (None without adaptation)."""
        if self.adapt <= 0:
            return None
        if contrast is None:
            raise ValueError("contrast adaptation needs the image's contrast")
        return _factors(contrast, self.reference, self.adapt)

    def distance(self, features: np.ndarray, factors: np.ndarray | None = None) -> np.ndarray:
        """Mahalanobis distance of each pixel's features (times ``factors``), clipped to [0, Z_MAX]."""
        f = features.reshape(-1, N_FEATURES)
        if factors is not None:
            f = f * factors
        z = (f - self.mean.astype(np.float32)) @ self.whiten.T.astype(np.float32)
        d = np.sqrt(np.einsum("ij,ij->i", z, z))
        return np.minimum(d, Z_MAX).reshape(features.shape[:-1]).astype(np.float32)

    def score(self, image: np.ndarray, residual: np.ndarray, contrast: np.ndarray | None = None,
              chunk_pixels: int = 1 << 20) -> np.ndarray:
        """``distance(local_features(image, residual))`` in blocks of rows (``feature_blocks``);
        ``contrast`` is the whole image's (``image_contrast``) when the statistics adapt to it."""
        factors = self.factors(contrast)
        out = np.empty(residual.shape, np.float32)
        for (r0, r1), block in feature_blocks(image, residual, chunk_pixels):
            out[r0:r1] = self.distance(block, factors)
        return out


def _factors(contrast: np.ndarray, reference: np.ndarray, adapt: float) -> np.ndarray:
    """(contrast / reference) ** -adapt per image feature, the ratio clipped to CONTRAST_RATIO;
    1 for the residual."""
    ratio = np.clip(np.maximum(contrast, 1e-12) / reference, *CONTRAST_RATIO)
    return np.append(ratio ** -adapt, 1.0).astype(np.float32)


@dataclass(frozen=True)
class FeaturePositionStats:
    """Feature statistics, and position statistics of the (smoothed) feature distance they give."""

    features: FeatureStats
    position: PositionStats


Stats = PositionStats | FeatureStats | FeaturePositionStats
_STATS = {"position": PositionStats, "features": FeatureStats, "features+position": FeaturePositionStats}


class Scorer:
    """Applies a ``ScoreConfig`` to residual rows; ``halo`` extra rows on each side make a band's
    result equal the whole map's."""

    def __init__(self, cfg: ScoreConfig = ScoreConfig(), stats: Stats | None = None):
        kind = _STATS.get(cfg.normalise)
        if kind is not None and not isinstance(stats, kind):
            raise ValueError(f"{cfg.normalise} normalisation needs the statistics learned by calibrate")
        self.cfg, self.stats = cfg, stats
        pair = stats if isinstance(stats, FeaturePositionStats) else None
        self.features = pair.features if pair else (stats if isinstance(stats, FeatureStats) else None)
        self.position = pair.position if pair else (stats if isinstance(stats, PositionStats) else None)
        if self.features is not None and self.features.adapt != cfg.adapt_contrast:
            raise ValueError(f"the statistics were learned with contrast adaptation {self.features.adapt:g}, "
                             f"the score asks for {cfg.adapt_contrast:g}")
        self.halo = smoothing_radius(cfg.smooth_sigma) + (FEATURE_HALO if self.needs_image else 0)

    def __call__(self, residual: np.ndarray, rows: tuple[int, int], shape: tuple[int, int],
                 image: np.ndarray | None = None, contrast: np.ndarray | None = None) -> np.ndarray:
        """Score of ``residual``, which holds rows ``rows`` of an image of ``shape`` (H, W);
        feature normalisation also needs those rows of the (grey) image, and contrast adaptation
        the whole image's ``image_contrast`` (measured here when the rows are the whole image)."""
        if self.features is not None:
            if image is None or image.shape != residual.shape:
                raise ValueError("feature normalisation needs the image rows of the residual")
            if self.needs_contrast and contrast is None:
                if tuple(rows) != (0, shape[0]):
                    raise ValueError("contrast adaptation of a band needs the whole image's contrast")
                contrast = contrast_of(image)
            score = smooth(self.features.score(image, residual, contrast), self.cfg.smooth_sigma)
        else:
            score = smooth(residual, self.cfg.smooth_sigma)
        if self.position is not None:
            mean, std = self.position.rows(shape, rows)
            score = np.clip((score - mean) / std, 0.0, Z_MAX).astype(np.float32)
        return score

    @property
    def needs_image(self) -> bool:
        return self.cfg.normalise.startswith("features")

    @property
    def needs_contrast(self) -> bool:
        return self.cfg.adapt_contrast > 0

    def score_range(self, residual_range: tuple[float, float]) -> tuple[float, float]:
        return (0.0, Z_MAX) if self.cfg.normalise != "none" else residual_range
