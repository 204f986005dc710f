"""Fixtures of the integration tests: one SeaweedFS S3 server and one local Ray per session, a model
trained on it, and clean scans of an archive that fault tests compare with."""

from __future__ import annotations

import pytest

from helpers.datasets import synth_root
from helpers.s3server import s3  # noqa: F401  (session-scoped SeaweedFS on 127.0.0.1)
from ray_inspect.config import InspectConfig, ModelConfig, ScanOptions, SynthConfig, TrainConfig


@pytest.fixture(scope="session")
def ray_session(s3):  # noqa: F811 - the fixture above, requested by name
    """One local Ray for the whole session, started after the S3 environment is set (workers inherit it)."""
    import ray

    from ray_inspect.distributed.cluster import ensure_ray

    ensure_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def trained_model(ray_session, patches, tmp_path_factory):
    """An SSIM-AE trained on Ray Train for two short epochs (enough for real, non-flat reconstructions).
    It is also the uninterrupted run that test_distributed_train's resumed command-line run must equal:
    change both together."""
    from ray_inspect.config import RunConfig
    from ray_inspect.distributed.train import fit

    url = str(tmp_path_factory.mktemp("models") / "ssim")
    fit(patches, url, ModelConfig(), TrainConfig(epochs=2, batch_size=32, seed=0),
        RunConfig(storage=str(tmp_path_factory.mktemp("runs")), run_name="fixture"))
    return url


@pytest.fixture(scope="session")
def calibrated(trained_model, dataset, tmp_path_factory):
    """The trained model with a threshold from the validation images: (model URL, threshold)."""
    import shutil

    from ray_inspect.config import InspectConfig
    from ray_inspect.steps.calibrate import calibrate

    url = str(tmp_path_factory.mktemp("cal") / "model")
    shutil.copytree(trained_model, url)
    res = calibrate(url, dataset, min_area=30, cfg=InspectConfig(precision="float32"))
    assert res["images"] == 4 and res["rule"] == "min_area"
    return url, res["threshold"]


@pytest.fixture(scope="session")
def archive(tmp_path_factory):
    """A bigger labelled root (40 test images), so that a scan lasts long enough to be interrupted."""
    return synth_root(tmp_path_factory, "archive",
                      SynthConfig(size=256, train=1, test_defective=30, test_good=10, validation=0, seed=5))


@pytest.fixture(scope="session")
def clean(ray_session, calibrated, archive, tmp_path_factory):
    """Uninterrupted bf16 scans of the archive with 1 and 2 actors: {workers: OUT}. Bits depend on the
    threads per actor (one each with 2 actors here, two with 1), so each fault test compares with the
    scan whose actors have its threads."""
    from ray_inspect.distributed.scan import EXIT_OK, scan

    outs = {}
    for workers in (1, 2):
        outs[workers] = str(tmp_path_factory.mktemp("clean") / "out")
        summary = scan(calibrated[0], archive, outs[workers], InspectConfig(precision="bfloat16"),
                       options=ScanOptions(workers=workers))
        assert summary["exit_code"] == EXIT_OK and summary["scanned"] == 40
    return outs
