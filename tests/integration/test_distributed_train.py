"""Data-parallel training on Ray Train: DDP sync, checkpoints, resume after a killed driver, S3 storage.
A training worker lost with its node: test_multinode.py."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from ray_inspect.config import ModelConfig, RunConfig, TrainConfig
from ray_inspect.distributed.train import TrainHooks, fit
from ray_inspect.io.artifact import load_model
from ray_inspect.io.patches import open_patches

pytestmark = pytest.mark.slow


def test_epoch_callback_error_is_raised_after_training(ray_session, patches, tmp_path):
    """A failing callback neither vanishes nor stops the training: fit raises it once the run has
    finished and checkpointed, writes no model, and a rerun resumes there and writes it."""
    calls = []

    def broken(stats: dict) -> None:
        calls.append(stats["epoch"])
        raise KeyError("no such column")

    run = RunConfig(storage=str(tmp_path / "runs"), run_name="broken-callback")
    with pytest.raises(KeyError, match="no such column") as raised:
        fit(patches, str(tmp_path / "m"), ModelConfig(latent=8), TrainConfig(epochs=2, batch_size=64), run,
            hooks=TrainHooks(on_epoch=broken))
    assert calls == [1, 2]                                 # later epochs still reached the callback
    assert any("rerun" in note for note in raised.value.__notes__)
    assert (tmp_path / "runs" / "broken-callback" / "epoch-00002").exists()
    assert not (tmp_path / "m" / "card.json").exists()
    card = fit(patches, str(tmp_path / "m"), ModelConfig(latent=8), TrainConfig(epochs=2, batch_size=64), run)
    assert card.training["epochs_run"] == 2 and (tmp_path / "m" / "card.json").exists()


def test_interrupted_driver_rerun_resumes_and_ends_like_an_uninterrupted_run(
        ray_session, trained_model, patches, tmp_path, monkeypatch):
    """The driver and the local Ray it started are killed after the first checkpoint. The rerun, through
    the command line with relative paths (Ray Train workers run in another directory), resumes there
    and ends with exactly the weights of an uninterrupted run of the same settings: the session's
    trained_model (conftest.py)."""
    from click.testing import CliRunner

    from ray_inspect.cli import main

    shutil.copytree(patches, tmp_path / "p.zarr")
    args = ["train", "p.zarr", "m", "--epochs", "2", "--batch-size", "32", "--seed", "0", "--workers", "1",
            "--storage", "runs", "--run-name", "resume", "--checkpoint-every", "1"]
    with open(tmp_path / "killed.log", "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ray_inspect.cli", *args], cwd=tmp_path,
                                env={**os.environ, "RAY_ADDRESS": ""}, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        deadline = time.time() + 300
        while time.time() < deadline and not (tmp_path / "runs" / "resume" / "epoch-00001").exists():
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)       # the driver and the local Ray it started
        proc.wait()
    killed_log = (tmp_path / "killed.log").read_text()
    assert (tmp_path / "runs" / "resume" / "epoch-00001").exists(), killed_log[-2000:]
    assert not (tmp_path / "m" / "card.json").exists()
    monkeypatch.chdir(tmp_path)
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output[-2000:]
    # the last checkpoint the killed run had registered (epoch 1, or 2 if the kill came that late)
    assert re.search(r"resumed from epoch [12] ", again.stderr), again.stderr[-2000:]
    a, b = load_model(trained_model), load_model(str(tmp_path / "m"))
    for k, v in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[k], v, rtol=0, atol=0)


LAYOUTS = {"2 unequal chunks": (100, 64), "10 chunks": (100, 10)}   # (patches, chunk)


def _layout(dataset, url, name):
    from ray_inspect.config import PrepareConfig
    from ray_inspect.io.patches import prepare

    n, chunk = LAYOUTS[name]
    prepare(dataset, url, PrepareConfig(patches=n, chunk=chunk, short_side=None, seed=2))
    return n


def _fit_layout(patches_url, n, workers, storage_url, model_url, epochs=1):
    seen = []
    card = fit(patches_url, model_url, ModelConfig(latent=16),
               TrainConfig(epochs=epochs, batch_size=32, precision="float32"),
               RunConfig(workers=workers, storage=storage_url, run_name="layout", max_failures=0),
               hooks=TrainHooks(on_epoch=seen.append))
    assert [m["epoch"] for m in seen] == list(range(1, epochs + 1))
    assert all(m["ranks_in_sync"] and m["workers"] == workers for m in seen)   # the parameter digest
    assert [m["patches"] for m in seen] == [n] * epochs  # every patch once (see tests/unit/test_training.py)
    assert card.patches["fingerprint"] == open_patches(patches_url).attrs["fingerprint"]
    assert card.training["workers"] == workers and card.training["epochs_run"] == epochs
    assert load_model(model_url).card.weights_sha256 == card.weights_sha256   # the model, where it was asked
    return seen


# Ray Train runs of the layouts that once made gloo abort: more workers than chunks (of unequal size),
# more chunks than workers; local and S3 storage. Every (patches, chunk, workers, batch)
# combination is checked without Ray in tests/unit/test_training.py (same steps on every rank).
def test_more_chunks_than_workers_two_workers_stay_in_sync_and_the_loss_falls(ray_session, dataset, tmp_path):
    n = _layout(dataset, str(tmp_path / "p.zarr"), "10 chunks")
    seen = _fit_layout(str(tmp_path / "p.zarr"), n, 2, str(tmp_path / "runs"), str(tmp_path / "m"), epochs=3)
    assert seen[-1]["loss"] < seen[0]["loss"]


def test_more_workers_than_unequal_chunks_from_s3(ray_session, s3, dataset):
    """3 workers on 2 chunks of 64 and 36 patches, the patches, checkpoints and model on S3."""
    from ray_inspect.io import storage

    base = s3.url("layouts", storage.unique_suffix())
    n = _layout(dataset, storage.join(base, "p.zarr"), "2 unequal chunks")
    assert open_patches(storage.join(base, "p.zarr")).chunks[0] == 64
    _fit_layout(storage.join(base, "p.zarr"), n, 3, storage.join(base, "runs"), storage.join(base, "model"))
    assert any("epoch-00001" in u for u in storage.find(storage.join(base, "runs", "layout")))  # checkpoints


def test_a_store_too_small_for_the_workers_fails_in_one_line(ray_session, dataset, tmp_path):
    from ray_inspect.config import PrepareConfig
    from ray_inspect.io.patches import prepare

    prepare(dataset, str(tmp_path / "p.zarr"), PrepareConfig(patches=2, chunk=2, short_side=None))
    r = subprocess.run([sys.executable, "-m", "ray_inspect.cli", "train", str(tmp_path / "p.zarr"),
                        str(tmp_path / "m"), "--workers", "3", "--epochs", "1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        "ray-inspect: error: 2 patches cannot feed 3 workers (each needs at least one); "
        "prepare more patches or train with fewer workers")
