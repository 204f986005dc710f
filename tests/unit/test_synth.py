"""Tests of the synthetic woven-fabric data set generator."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from ray_inspect.config import SynthConfig
from ray_inspect.io import synth

SMALL = SynthConfig(texture="plain", size=256, train=3, validation=2, test_good=2, test_defective=6, seed=1)


def read_png(path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "L"
        return np.asarray(im)


def files(root) -> dict[str, bytes]:
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def local_std(img: np.ndarray, size: int = 5) -> np.ndarray:
    mean = ndimage.uniform_filter(img.astype(np.float64), size)
    return np.sqrt(np.clip(ndimage.uniform_filter(img.astype(np.float64) ** 2, size) - mean ** 2, 0, None))


def test_layout_and_counts(tmp_path):
    calls = []
    summary = synth.generate(str(tmp_path), SMALL, progress=calls.append)
    # 6 defective images round-robin over 4 types: cut, rough get 2, the others 1
    expected = {"train/good": 3, "validation/good": 2, "test/good": 2, "test/cut": 2, "test/rough": 2,
                "test/contamination": 1, "test/smooth": 1}
    assert summary["counts"] == expected
    assert summary["images"] == 13 and summary["masks"] == 6
    assert (summary["texture"], summary["size"], summary["seed"]) == ("plain", 256, 1)
    assert calls == [1] * 13
    got = set(files(tmp_path))
    want = {f"{group}/{i:03d}.png" for group, n in expected.items() for i in range(n)}
    want |= {f"ground_truth/{group[5:]}/{i:03d}_mask.png"
             for group, n in expected.items() if group.startswith("test/") and group != "test/good"
             for i in range(n)}
    assert got == {w.replace("/", os.sep) for w in want}
    img = read_png(tmp_path / "train" / "good" / "000.png")
    assert img.shape == (256, 256) and img.dtype == np.uint8
    assert img.std() > 10  # a texture, not a flat image
    assert not (tmp_path / "ground_truth" / "good").exists()


def test_fsspec_url():
    url = "memory://synth-test/ds"
    cfg = SynthConfig(size=128, train=1, validation=1, test_good=1, test_defective=1)
    synth.generate(url, cfg)
    import fsspec
    fs = fsspec.filesystem("memory")
    names = sorted(p.split("ds/", 1)[1] for p in fs.find("/synth-test/ds"))
    assert names == ["ground_truth/cut/000_mask.png", "test/cut/000.png", "test/good/000.png",
                     "train/good/000.png", "validation/good/000.png"]
    fs.rm("/synth-test", recursive=True)


def test_deterministic(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    synth.generate(str(a), SMALL)
    synth.generate(str(b), SMALL)
    synth.generate(str(c), SynthConfig(**{**SMALL.__dict__, "seed": 2}))
    fa, fb, fc = files(a), files(b), files(c)
    assert fa == fb
    assert fa.keys() == fc.keys()
    assert all(fa[k] != fc[k] for k in fa)


def test_images_independent_of_counts():
    more = SynthConfig(**{**SMALL.__dict__, "train": 10, "test_defective": 20})
    for group in ("train/good", "test/rough"):
        assert np.array_equal(synth.render(SMALL, group, 1).image, synth.render(more, group, 1).image)
    # the splits are different realisations, not copies of each other
    first = synth.render(SMALL, "train/good", 0).image
    for group in ("validation/good", "test/good"):
        assert not np.array_equal(first, synth.render(SMALL, group, 0).image)


def test_realisations_differ_but_look_alike():
    imgs = [synth.render(SMALL, "train/good", i).image for i in range(3)]
    assert not np.array_equal(imgs[0], imgs[1])
    means, stds = [im.mean() for im in imgs], [im.std() for im in imgs]
    assert max(means) - min(means) < 0.05 and max(stds) / min(stds) < 1.3


@pytest.mark.parametrize("texture", synth.TEXTURES)
def test_texture_is_periodic(texture):
    """The weave repeats with the thread period: the autocorrelation has a clear peak there."""
    cfg = SynthConfig(texture=texture, size=256)
    img = synth.render(cfg, "train/good", 0).image.astype(np.float64)
    img -= img.mean()
    spec = np.abs(np.fft.rfft2(img)) ** 2
    spec[0, 0] = 0
    ky, kx = np.unravel_index(np.argmax(spec), spec.shape)
    freq = max(min(ky, 256 - ky), kx) / 256  # cycles per pixel of the strongest component
    period = synth.WEAVES[texture].period * 256 / 512
    # the strongest component is the thread frequency or a low harmonic of the weave repeat
    assert any(abs(freq - h / (period * synth.WEAVES[texture].repeat)) < 0.02
               for h in range(1, 2 * synth.WEAVES[texture].repeat + 1))


def test_invalid_texture():
    with pytest.raises(ValueError, match="plain, twill"):
        synth.generate("/nonexistent", SynthConfig(texture="denim"))
    with pytest.raises(ValueError):
        synth.render(SynthConfig(size=256), "test/scratch", 0)


@pytest.mark.parametrize("texture", synth.TEXTURES)
@pytest.mark.parametrize("kind", synth.DEFECTS)
def test_defect_changes_exactly_the_mask(texture, kind):
    cfg = SynthConfig(texture=texture, size=256)
    for index in range(3):
        s = synth.render(cfg, f"test/{kind}", index)
        assert s.mask.shape == s.image.shape == (256, 256)
        assert s.mask.sum() >= 30  # visible: several pixels across even at 256 px
        a, b = np.rint(s.image * 255), np.rint(s.clean * 255)
        changed = a != b
        assert not (changed & ~s.mask).any()
        assert changed[s.mask].mean() > 0.9
        assert np.abs(a - b)[s.mask].mean() > 8  # a clear change, not a trace


def test_written_masks_match_images(tmp_path):
    synth.generate(str(tmp_path), SMALL)
    for kind in synth.DEFECTS:
        for path in sorted((tmp_path / "test" / kind).glob("*.png")):
            mask = read_png(tmp_path / "ground_truth" / kind / f"{path.stem}_mask.png")
            assert mask.shape == read_png(path).shape
            assert set(np.unique(mask)) == {0, 255}
            sample = synth.render(SMALL, f"test/{kind}", int(path.stem))
            assert np.array_equal(mask > 0, sample.mask)


@pytest.mark.parametrize("texture", synth.TEXTURES)
def test_smooth_keeps_brightness_and_removes_structure(texture):
    cfg = SynthConfig(texture=texture, size=256)
    for index in range(4):
        s = synth.render(cfg, "test/smooth", index)
        ring = ndimage.binary_dilation(s.mask, iterations=8) & ~s.mask
        inside = ndimage.binary_erosion(s.mask, iterations=3)
        assert abs(s.image[s.mask].mean() - s.image[ring].mean()) * 255 < 5  # within a few gray levels
        assert local_std(s.image)[inside].mean() < 0.3 * local_std(s.clean)[inside].mean()


def edge_energy(img: np.ndarray, mask: np.ndarray) -> float:
    return np.abs(ndimage.laplace(img.astype(np.float64)))[mask].mean()


@pytest.mark.parametrize("texture", synth.TEXTURES)
def test_rough_and_contamination_differ_from_texture(texture):
    cfg = SynthConfig(texture=texture, size=256)
    for index in range(3):
        rough = synth.render(cfg, "test/rough", index)
        # much more high-frequency energy
        assert edge_energy(rough.image, rough.mask) > 1.8 * edge_energy(rough.clean, rough.mask)
        stain = synth.render(cfg, "test/contamination", index)
        assert abs(stain.image[stain.mask].mean() - stain.clean[stain.mask].mean()) > 0.08  # > 20 gray levels


def test_good_test_images_have_no_masks(tmp_path):
    synth.generate(str(tmp_path), SMALL)
    assert synth.render(SMALL, "test/good", 0).mask is None
    gt = tmp_path / "ground_truth"
    assert sorted(p.name for p in gt.iterdir()) == sorted(synth.DEFECTS)
    assert not any("good" in str(p.relative_to(gt)) for p in gt.rglob("*"))
