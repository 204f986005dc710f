"""Shared fixtures: small synthetic data sets and a briefly trained model, built once per session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")

from ray_inspect.config import ModelConfig, PrepareConfig, SynthConfig, TrainConfig  # noqa: E402
from s3server import s3  # noqa: E402,F401  (session-scoped SeaweedFS on 127.0.0.1)


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    """A 256-px plain-weave data set: 12 train, 8 defective + 4 good test, 4 validation images."""
    from ray_inspect.synth import generate

    root = str(tmp_path_factory.mktemp("data") / "plain")
    generate(root, SynthConfig(size=256, train=12, test_defective=8, test_good=4, validation=4, seed=3))
    return root


@pytest.fixture(scope="session")
def patches(dataset, tmp_path_factory):
    from ray_inspect.patches import prepare

    url = str(tmp_path_factory.mktemp("patches") / "p.zarr")
    prepare(dataset, url, PrepareConfig(patches=300, resize=None, chunk=64, seed=1))
    return url


@pytest.fixture(scope="session")
def ray_session(s3):
    """One local Ray for the whole session, started after the S3 environment is set (workers inherit it)."""
    import ray

    from ray_inspect.raycluster import ensure_ray

    ensure_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def trained_model(ray_session, patches, tmp_path_factory):
    """An SSIM-AE trained on Ray Train for two short epochs (enough for real, non-flat reconstructions)."""
    from ray_inspect.raytrain import RunConfig, fit

    url = str(tmp_path_factory.mktemp("models") / "ssim")
    fit(patches, url, ModelConfig(), TrainConfig(epochs=2, batch_size=32, seed=0),
        RunConfig(storage=str(tmp_path_factory.mktemp("runs")), run_name="fixture"))
    return url


@pytest.fixture(scope="session")
def calibrated(trained_model, dataset, tmp_path_factory):
    """The trained model with a threshold from the validation images: (model URL, threshold)."""
    import shutil

    from ray_inspect.calibrate import calibrate
    from ray_inspect.config import InspectConfig

    url = str(tmp_path_factory.mktemp("cal") / "model")
    shutil.copytree(trained_model, url)
    res = calibrate(url, dataset, min_area=30, cfg=InspectConfig(precision="float32"))
    assert res["images"] == 4 and res["rule"] == "min_area"
    return url, res["threshold"]
