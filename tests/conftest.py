"""Fixtures for every test: small synthetic data sets and patch stores, built once per session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")
# Ray Train's controller polls its workers every 2 s: the tests' short runs end sooner when it polls
# more often.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# Ray Train watches for preempted nodes with one more actor per run; a local test Ray has none to lose.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

from helpers.datasets import synth_root  # noqa: E402
from ray_inspect.config import PrepareConfig, SynthConfig  # noqa: E402


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    """A 256-px plain-weave data set: 12 train, 8 defective + 4 good test, 4 validation images."""
    return synth_root(tmp_path_factory, "data",
                      SynthConfig(size=256, train=12, test_defective=8, test_good=4, validation=4, seed=3))


@pytest.fixture(scope="session")
def patches(dataset, tmp_path_factory):
    from ray_inspect.io.patches import prepare

    url = str(tmp_path_factory.mktemp("patches") / "p.zarr")
    prepare(dataset, url, PrepareConfig(patches=300, short_side=None, chunk=64, seed=1))
    return url
