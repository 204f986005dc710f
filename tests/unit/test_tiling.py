"""Sliding-window reconstruction against a naive tile-by-tile loop."""

import numpy as np
import pytest
import torch

from ray_inspect import reconstruct
from ray_inspect.config import ModelConfig
from ray_inspect.core.inference import _FusedConvStack, bf16_supported, precision_context, prepare_model
from ray_inspect.core.model import ConvAE, ConvVAE
from ray_inspect.core.tiling import TileGrid, window_starts


def naive(model, image, stride, patch=128):
    """Every window one at a time, summed and counted per pixel in plain numpy."""
    h, w = image.shape
    ph, pw = max(h, patch), max(w, patch)
    padded = np.pad(image, ((0, ph - h), (0, pw - w)), mode="symmetric")
    acc = np.zeros((ph, pw))
    cnt = np.zeros((ph, pw))
    ys = list(range(0, ph - patch + 1, stride))
    xs = list(range(0, pw - patch + 1, stride))
    ys += [ph - patch] if ys[-1] != ph - patch else []
    xs += [pw - patch] if xs[-1] != pw - patch else []
    with torch.no_grad():
        for y in ys:
            for x in xs:
                tile = torch.tensor(padded[y:y + patch, x:x + patch], dtype=torch.float32)[None, None]
                acc[y:y + patch, x:x + patch] += model(tile)[0, 0].numpy()
                cnt[y:y + patch, x:x + patch] += 1
    assert cnt.min() >= 1
    return np.clip(acc / cnt, 0, 1)[:h, :w]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ConvAE(ModelConfig()).eval()


@pytest.mark.parametrize("shape,stride",
                         [((200, 171), 30), ((128, 301), 30), ((157, 157), 45), ((90, 140), 30)])
def test_matches_naive_loop(model, shape, stride):
    image = np.random.default_rng(0).random(shape).astype(np.float32)
    got = reconstruct(model, image, stride=stride, precision="float32", batch_size=7)
    assert got.shape == image.shape and got.dtype == np.float32
    ref = naive(model, image, stride)
    assert np.abs(got - ref).max() <= 1e-5


def test_stride_wider_than_a_window_is_refused():
    from ray_inspect.config import InspectConfig

    with pytest.raises(ValueError, match="every pixel covered"):
        InspectConfig(stride=129)


def test_grid_covers_every_pixel_flush_with_borders():
    for size in (128, 129, 157, 256, 1000):
        s = window_starts(size, 128, 30)
        assert s[0] == 0 and s[-1] == size - 128 and np.all(np.diff(s) <= 30)
    g = TileGrid(200, 171)
    cov = g.coverage.numpy()
    brute = np.zeros((200, 171))
    for y, x in g.positions:
        brute[y:y + 128, x:x + 128] += 1
    np.testing.assert_array_equal(cov, brute)
    assert cov.min() >= 1


def test_bfloat16_close_to_float32_and_colour_shape(model):
    image = np.random.default_rng(1).random((160, 190)).astype(np.float32)
    f32 = reconstruct(model, image, precision="float32")
    bf16 = reconstruct(model, image, precision="bfloat16")
    assert np.abs(f32 - bf16).max() < 0.05
    torch.manual_seed(0)
    colour = ConvAE(ModelConfig(channels=3)).eval()
    rgb = np.random.default_rng(2).random((130, 140, 3)).astype(np.float32)
    assert reconstruct(colour, rgb).shape == rgb.shape


@pytest.mark.skipif(not bf16_supported(), reason="no native bfloat16 on this CPU")
@pytest.mark.parametrize("arch", [ConvAE, ConvVAE])
def test_fused_bfloat16_stacks_match_autocast_and_do_not_depend_on_the_batch(arch):
    torch.manual_seed(0)
    base = arch(ModelConfig(loss="vae" if arch is ConvVAE else "ssim")).eval()
    fused = prepare_model(base, "bfloat16")
    assert isinstance(fused.encoder, _FusedConvStack) and isinstance(fused.decoder, _FusedConvStack)
    assert isinstance(base.encoder, torch.nn.Sequential)                  # the caller's model is untouched
    x = torch.rand(20, 1, 128, 128, generator=torch.Generator().manual_seed(4))

    def run(m, x):   # the VAE decodes its posterior mean
        return m.decoder(m.encode(x)[0]) if arch is ConvVAE else m(x)

    with torch.inference_mode():
        exact = run(base, x)
        with precision_context("bfloat16", torch.device("cpu")):
            autocast = run(base, x.contiguous(memory_format=torch.channels_last)).float()
        got = run(fused, x)
        one_by_one = torch.cat([run(fused, x[i:i + 1]) for i in range(len(x))])
    assert got.dtype == torch.bfloat16
    e_fused, e_autocast = (got.float() - exact).abs(), (autocast - exact).abs()
    assert e_fused.max() <= 1.5 * e_autocast.max() and e_fused.mean() <= 1.2 * e_autocast.mean()
    torch.testing.assert_close(got.float(), autocast, rtol=0, atol=2**-6)
    assert torch.equal(one_by_one, got)                                   # what exact bands rest on


def test_vae_reconstructs_from_posterior_mean():
    torch.manual_seed(0)
    vae = ConvVAE(ModelConfig(loss="vae")).eval()
    image = np.random.default_rng(3).random((140, 150)).astype(np.float32)
    assert np.abs(reconstruct(vae, image) - naive(vae, image, 30)).max() <= 1e-5


@pytest.mark.parametrize("h,w,band,batch", [(1000, 700, 97, 64), (700, 3000, 250, 64), (500, 300, 64, 16)])
def test_bands_cover_their_rows_with_the_whole_images_batches(h, w, band, batch):
    from ray_inspect.core.tiling import plan_bands

    g = TileGrid(h, w, 128, 30)
    whole = list(g.batches(batch))
    bands = plan_bands(g, h, band, margin=4, radius=5, batch_size=batch)
    assert [b.rows for b in bands] == [(s, min(h, s + band)) for s in range(0, h, band)]
    for b in bands:
        (o0, o1), (r0, r1), (c0, c1) = b.rows, b.residual_rows, b.recon_rows
        (j0, j1), (i0, i1) = b.grid_rows, b.input_rows
        assert r0 == max(0, o0 - 4) and r1 == min(h, o1 + 4) and c0 == max(0, r0 - 5) and c1 == min(h, r1 + 5)
        # every window touching the reconstruction rows is in the band, and it reads inside its input rows
        touching = [j for j, y in enumerate(g.ys) if y < c1 and y + 128 > c0]
        assert j0 <= min(touching) and max(touching) < j1
        assert i0 == g.ys[j0] and i1 == g.ys[j1 - 1] + 128
        # its batches are batches of the whole image (float32 results depend on batch composition)
        nx = len(g.xs)
        mine = list(g.batches(batch, (j0, j1)))
        assert set(mine) <= set(whole) and sum(e - s for s, e in mine) == (j1 - j0) * nx


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
@pytest.mark.parametrize("training", [True, False])
def test_reconstruct_leaves_the_callers_model_as_it_was(precision, training):
    from ray_inspect.config import ModelConfig
    from ray_inspect.core.inference import reconstruct
    from ray_inspect.core.model import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig()).train(training)
    before = {k: (v.clone(), v.stride(), v.dtype, v.device) for k, v in model.state_dict().items()}
    img = np.random.default_rng(0).random((150, 170)).astype(np.float32)
    out = reconstruct(model, img, precision=precision)
    assert out.shape == img.shape
    assert model.training is training
    for k, v in model.state_dict().items():
        value, stride, dtype, device = before[k]
        assert torch.equal(v, value) and v.stride() == stride and v.dtype == dtype and v.device == device, k
    assert all(p.is_contiguous() for p in model.parameters())        # not switched to channels-last
