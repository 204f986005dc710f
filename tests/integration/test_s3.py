"""Storage, synthetic data and Zarr patches on a real S3-compatible server (SeaweedFS, see s3server.py)."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from ray_inspect.config import PrepareConfig, SynthConfig
from ray_inspect.io import storage

pytestmark = pytest.mark.slow


def _forget_s3fs_instances():
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


def test_storage_round_trip(s3):
    base = s3.url("roundtrip", storage.unique_suffix())
    a, b = storage.join(base, "a.bin"), storage.join(base, "sub", "b.txt")
    assert not storage.exists(a)
    storage.write_bytes(a, b"\x00\x01payload")
    storage.write_text(b, "hello")
    storage.write_bytes(a, b"\x00\x01payload")  # idempotent overwrite
    assert storage.read_bytes(a) == b"\x00\x01payload"
    assert storage.read_text(b) == "hello"
    assert storage.exists(a) and storage.exists(b)
    assert storage.find(base) == [a, b]
    assert storage.relative(b, base) == "sub/b.txt"
    with pytest.raises(storage.StorageError, match="no such file"):
        storage.read_bytes(storage.join(base, "missing"))
    with pytest.raises(storage.StorageError, match="no such directory"):
        storage.find(storage.join(base, "nothing-here"))
    storage.remove(base, recursive=True)
    assert not storage.exists(a)


def test_wrong_secret_fails_fast_with_one_line_error(s3, monkeypatch):
    url = s3.url("secret-check", "x.bin")
    storage.write_bytes(url, b"x")
    wrong = "not-" + s3.secret_key[::-1]
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    _forget_s3fs_instances()  # s3fs caches instances (with their credentials) by constructor arguments
    try:
        t0 = time.monotonic()
        with pytest.raises(storage.StorageError) as info:
            storage.read_bytes(url)
        assert time.monotonic() - t0 < 5
        msg = str(info.value)
        assert msg == f"{url}: permission denied"
        assert "\n" not in msg and wrong not in msg and s3.secret_key not in msg
        # The other entry points fail fast too, with the same one-line error.
        for call in (lambda: storage.write_bytes(url, b"y"), lambda: storage.exists(url),
                     lambda: storage.find(s3.url("secret-check"))):
            t0 = time.monotonic()
            with pytest.raises(storage.StorageError, match="permission denied") as info:
                call()
            assert time.monotonic() - t0 < 5
            assert "\n" not in str(info.value) and wrong not in str(info.value)
    finally:
        monkeypatch.undo()
        _forget_s3fs_instances()
    assert storage.read_bytes(url) == b"x"


def test_synth_and_prepare_on_s3_match_local(s3, tmp_path):
    from ray_inspect.io.patches import open_patches, prepare
    from ray_inspect.io.synth import generate

    synth = SynthConfig(size=128, train=3, test_defective=4, test_good=1, validation=1)
    prep = PrepareConfig(patches=40, short_side=None, chunk=16)
    local_data, remote_data = str(tmp_path / "data"), s3.url("data")
    generate(local_data, synth)
    generate(remote_data, synth)

    local_files = storage.find(local_data)
    remote_files = storage.find(remote_data)
    assert [storage.relative(f, local_data) for f in local_files] == \
        [storage.relative(f, remote_data) for f in remote_files]
    for lf, rf in zip(local_files, remote_files, strict=True):
        assert storage.read_bytes(lf) == storage.read_bytes(rf), rf

    local_attrs = prepare(local_data, str(tmp_path / "p.zarr"), prep)
    remote_attrs = prepare(remote_data, s3.url("p.zarr"), prep)
    assert remote_attrs["fingerprint"] == local_attrs["fingerprint"]
    assert {k: v for k, v in remote_attrs.items() if k != "source"} == \
        {k: v for k, v in local_attrs.items() if k != "source"}

    local = open_patches(str(tmp_path / "p.zarr"))
    remote = open_patches(s3.url("p.zarr"))
    assert remote.shape == local.shape == (40, 1, 128, 128)
    assert remote.chunks == local.chunks == (16, 1, 128, 128)
    assert remote.dtype == np.uint8
    assert remote.attrs["fingerprint"] == local.attrs["fingerprint"]
    assert remote.attrs["complete"] is True
    ra, la = remote[:], local[:]
    assert ra.tobytes() == la.tobytes()
    # 40 patches in chunks of 16: three chunk objects plus the metadata document.
    keys = sorted(storage.relative(f, s3.url("p.zarr")) for f in storage.find(s3.url("p.zarr")))
    assert keys == ["c/0/0/0/0", "c/1/0/0/0", "c/2/0/0/0", "zarr.json"]


def test_open_patches_on_s3_refuses_missing_and_incomplete(s3):
    import zarr

    from ray_inspect.io.patches import open_patches

    with pytest.raises(storage.StorageError, match="not a patch array"):
        open_patches(s3.url("no-such.zarr"))
    url = s3.url("half.zarr")
    zarr.create_array(store=url, shape=(4, 1, 128, 128), chunks=(2, 1, 128, 128), dtype="uint8",
                      storage_options=storage.storage_options(url), overwrite=True,
                      attributes={"complete": False})
    with pytest.raises(storage.StorageError, match="incomplete"):
        open_patches(url)


def test_fixture_environment(s3):
    assert os.environ["RAY_INSPECT_S3_ENDPOINT"] == s3.endpoint
    assert os.environ["AWS_DEFAULT_REGION"] == "us-east-1"
    assert storage.storage_options(s3.url("x"))["endpoint_url"] == s3.endpoint
    assert s3.secret_key not in repr(s3) and s3.access_key not in repr(s3)
