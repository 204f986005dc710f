"""Data-parallel training on Ray Train: DDP sync, checkpoints, resume, worker faults, S3 storage."""

import os
import re
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
import torch

from ray_inspect.config import ModelConfig, RunConfig, TrainConfig
from ray_inspect.distributed.train import TrainHooks, fit
from ray_inspect.io.artifact import load_model, read_card
from ray_inspect.io.patches import open_patches

pytestmark = pytest.mark.slow


def test_two_workers_stay_in_sync_and_loss_falls(ray_session, patches, tmp_path):
    seen = []
    card = fit(patches, str(tmp_path / "m"), ModelConfig(latent=16), TrainConfig(epochs=3, batch_size=32),
               RunConfig(workers=2, storage=str(tmp_path / "runs"), run_name="sync"),
               hooks=TrainHooks(on_epoch=seen.append))
    assert [m["epoch"] for m in seen] == [1, 2, 3]
    assert all(m["ranks_in_sync"] and m["workers"] == 2 for m in seen)
    assert seen[-1]["loss"] < seen[0]["loss"]
    assert card.training["workers"] == 2 and card.training["epochs_run"] == 3
    assert load_model(str(tmp_path / "m")).card.weights_sha256 == card.weights_sha256


def _own_train_workers() -> list[psutil.Process]:
    """This session's Ray Train workers (its local Ray's raylet is a child of this process), never
    those of another test run on the same machine."""
    me, found = os.getpid(), []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any("RayTrainWorker" in c for c in (p.info["cmdline"] or [])) \
                    and me in {a.pid for a in p.parents()}:
                found.append(p)
        except psutil.NoSuchProcess:
            continue
    return found


def test_worker_killed_resumes_from_last_checkpoint(ray_session, patches, tmp_path):
    seen = []
    def killer():
        deadline = time.time() + 600   # a CPU without bf16 instructions takes about a minute per epoch
        while time.time() < deadline and not any(m["epoch"] >= 3 for m in seen):
            time.sleep(0.05)
        for p in _own_train_workers():
            p.send_signal(signal.SIGKILL)
            return

    t = threading.Thread(target=killer)
    t.start()
    fit(patches, str(tmp_path / "m"), ModelConfig(latent=16), TrainConfig(epochs=7, batch_size=64),
        RunConfig(workers=2, storage=str(tmp_path / "runs"), run_name="fault", max_failures=2),
        hooks=TrainHooks(on_epoch=seen.append))
    t.join()
    epochs = [m["epoch"] for m in seen]
    assert sorted(set(epochs)) == list(range(1, 8))
    restart = max(m["resumed_from"] for m in seen)     # the checkpoint the restarted worker group loaded
    assert restart >= 2                                # at least the checkpoint reported before the kill
    assert all(epochs.count(e) == 1 for e in range(1, restart + 1))   # epochs before it never ran again
    assert len(epochs) > 7                             # something was in fact redone after the kill


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


def _train_cmd(patches, model, storage, name, epochs):
    return [sys.executable, "-m", "ray_inspect.cli", "train", patches, model, "--latent", "16", "--epochs",
            str(epochs), "--batch-size", "64", "--workers", "1", "--storage", storage, "--run-name", name,
            "--checkpoint-every", "1"]


def test_driver_interrupted_rerun_finishes_identically(patches, tmp_path):
    storage = str(tmp_path / "runs")
    env = {**os.environ, "RAY_ADDRESS": ""}
    ref = subprocess.run(_train_cmd(patches, str(tmp_path / "ref"), storage, "ref", 3), env=env,
                         capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-2000:]
    cmd = _train_cmd(patches, str(tmp_path / "m"), storage, "resume", 3)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (tmp_path / "runs" / "resume" / "epoch-00002").exists():
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)       # the driver and the local Ray it started
    proc.wait()
    assert not (tmp_path / "m" / "card.json").exists()
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    # the last checkpoint the killed run had registered (epoch 1 or 2: its folder can appear first)
    assert re.search(r"resumed from epoch [12] ", again.stderr), again.stderr[-2000:]
    a, b = load_model(str(tmp_path / "ref")), load_model(str(tmp_path / "m"))
    for k, v in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[k], v, rtol=0, atol=0)


LAYOUTS = {"1 chunk": (256, 256), "3 unequal chunks": (160, 64), "10 chunks": (100, 10)}   # (patches, chunk)


def _layout(dataset, url, name):
    from ray_inspect.config import PrepareConfig
    from ray_inspect.io.patches import prepare

    n, chunk = LAYOUTS[name]
    prepare(dataset, url, PrepareConfig(patches=n, chunk=chunk, short_side=None, seed=2))
    return n


def _fit_layout(patches_url, n, workers, storage_url, name, model_url):
    seen = []
    card = fit(patches_url, model_url, ModelConfig(latent=16),
               TrainConfig(epochs=1, batch_size=32, precision="float32"),
               RunConfig(workers=workers, storage=storage_url, run_name=name, max_failures=0),
               hooks=TrainHooks(on_epoch=seen.append))
    assert [m["epoch"] for m in seen] == [1]
    assert all(m["ranks_in_sync"] and m["workers"] == workers for m in seen)   # the parameter digest
    assert [m["patches"] for m in seen] == [n]          # every patch once (see tests/unit/test_training.py)
    assert card.patches["fingerprint"] == open_patches(patches_url).attrs["fingerprint"]
    assert read_card(model_url).weights_sha256 == card.weights_sha256     # the model, where it was asked


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("workers", [2, 3])
def test_any_layout_feeds_any_number_of_workers(ray_session, dataset, tmp_path, layout, workers):
    n = _layout(dataset, str(tmp_path / "p.zarr"), layout)
    _fit_layout(str(tmp_path / "p.zarr"), n, workers, str(tmp_path / "runs"), "layout", str(tmp_path / "m"))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_any_layout_feeds_three_workers_from_s3(ray_session, s3, dataset, layout):
    from ray_inspect.io import storage

    base = s3.url("layouts", storage.unique_suffix())
    n = _layout(dataset, storage.join(base, "p.zarr"), layout)
    _fit_layout(storage.join(base, "p.zarr"), n, 3, storage.join(base, "runs"), "layout",
                storage.join(base, "model"))
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
