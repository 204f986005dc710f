"""SSIM maps against scikit-image's reference implementation."""

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from ray_inspect import ssim_maps
from ray_inspect.config import SSIMConfig
from ray_inspect.core.ssim import gaussian_blur, ssim_loss, ssim_map

BORDER = 5


def reference(a, b):
    _, full = structural_similarity(a, b, data_range=1, gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False, full=True)
    return full


def texture(rng, h, w):
    yy, xx = np.mgrid[:h, :w]
    t = 0.5 + 0.25 * np.sin(xx / 2.3) * np.cos(yy / 3.1) + 0.05 * rng.standard_normal((h, w))
    return np.clip(t, 0, 1)


@pytest.mark.parametrize("kind", ["random", "texture"])
@pytest.mark.parametrize("shape", [(64, 64), (97, 130), (331, 260)])
def test_matches_skimage(kind, shape):
    rng = np.random.default_rng(1)
    a = rng.random(shape) if kind == "random" else texture(rng, *shape)
    b = np.clip(a + 0.15 * rng.standard_normal(shape), 0, 1)
    ref = reference(a, b)
    for dtype in (torch.float64, torch.float32):
        ta, tb = torch.tensor(a, dtype=dtype)[None, None], torch.tensor(b, dtype=dtype)[None, None]
        for got in (ssim_maps(ta, tb).ssim, ssim_map(ta, tb)):   # ssim_map strips images > 128 rows
            diff = np.abs(got[0, 0].double().numpy() - ref)
            inner = diff[BORDER:-BORDER, BORDER:-BORDER]
            assert inner.max() <= 1e-4, (dtype, inner.max())
            assert diff.max() <= 1e-4  # symmetric padding matches scipy's 'reflect', borders included


def test_batch_and_channels_are_independent():
    rng = np.random.default_rng(2)
    a = rng.random((3, 2, 40, 50))
    b = np.clip(a + 0.1 * rng.standard_normal(a.shape), 0, 1)
    got = ssim_maps(torch.tensor(a), torch.tensor(b)).ssim.numpy()
    for n in range(3):
        for c in range(2):
            np.testing.assert_allclose(got[n, c], reference(a[n, c], b[n, c]), atol=1e-10)


def test_components_multiply_to_ssim_and_fast_path_agrees():
    rng = np.random.default_rng(3)
    a = torch.tensor(rng.random((2, 1, 48, 48)))
    b = torch.tensor(np.clip(a.numpy() + 0.2 * rng.standard_normal(a.shape), 0, 1))
    m = ssim_maps(a, b)
    torch.testing.assert_close(m.luminance * m.contrast * m.structure, m.ssim, atol=1e-9, rtol=0)
    torch.testing.assert_close(ssim_map(a, b), m.ssim, atol=1e-12, rtol=0)
    assert m.luminance.shape == a.shape and m.contrast.max() <= 1 + 1e-12


def test_identical_images_give_one_and_exponents_apply():
    a = torch.rand(1, 1, 32, 32, dtype=torch.float64)
    assert torch.allclose(ssim_maps(a, a).ssim, torch.ones_like(a))
    b = (a * 0.5 + 0.2)
    m1 = ssim_maps(a, b)
    m2 = ssim_maps(a, b, cfg=SSIMConfig(alpha=2.0, beta=1.0, gamma=1.0))
    torch.testing.assert_close(m2.ssim, m1.luminance**2 * m1.contrast * m1.structure)


def test_blur_is_the_scipy_gaussian():
    from scipy import ndimage

    x = np.random.default_rng(4).random((1, 1, 300, 1100))  # several cache blocks
    got = gaussian_blur(torch.tensor(x))[0, 0].numpy()
    ref = ndimage.gaussian_filter(x[0, 0], sigma=1.5, truncate=3.5, mode="reflect")
    np.testing.assert_allclose(got, ref, atol=1e-12)


def test_loss_is_differentiable_and_float32_under_autocast():
    x = torch.rand(4, 1, 32, 32)
    y = torch.rand(4, 1, 32, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ssim_loss(y.to(torch.bfloat16), x)
    assert loss.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0


@pytest.mark.parametrize("level", [0.0, 0.02, 0.98, 1.0])
def test_dark_and_bright_images(level):
    """Near 0 and 1 the luminance terms are as small as c1. float64 matches skimage; float32 loses
    ~1e-4 there to the moments' cancellation (the torch path alike), and the fast path may not add
    a cancellation of its own; identical images give exactly similar maps."""
    rng = np.random.default_rng(5)
    a = np.clip(level + 0.02 * rng.standard_normal((150, 140)), 0, 1)
    b = np.clip(a + 0.01 * rng.standard_normal(a.shape), 0, 1)
    flat = np.full_like(a, level)
    for x, y in ((a, b), (a, a), (flat, flat)):
        ref = reference(x, y)
        t64 = [torch.tensor(v)[None, None] for v in (x, y)]
        for got in (ssim_maps(*t64).ssim, ssim_map(*t64)):
            assert np.abs(got[0, 0].numpy() - ref).max() <= 1e-9
        t32 = [torch.tensor(v, dtype=torch.float32)[None, None] for v in (x, y)]
        slow = np.abs(ssim_maps(*t32).ssim[0, 0].double().numpy() - ref).max()
        fast = np.abs(ssim_map(*t32)[0, 0].double().numpy() - ref).max()
        assert fast <= 1.25 * slow + 1e-6 and fast <= 2e-4, (fast, slow)
        if x is y:
            assert np.abs(ssim_map(*t32).numpy() - 1).max() <= 1e-6
