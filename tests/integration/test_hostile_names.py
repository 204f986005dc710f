"""Hostile names: every key is scanned to its own outputs below OUT or listed in errors.jsonl, and
nothing is written anywhere else. S3 keys as AWS keeps them (moto's server: ``..`` and empty
segments survive) scanned into a local OUT, and odd local file names scanned into an S3 OUT."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tifffile
from PIL import Image

from helpers.motoserver import KEY, SECRET, moto_server
from helpers.s3server import _client
from ray_inspect.distributed.scan import manifest_entries
from ray_inspect.io import storage
from ray_inspect.steps.imagescan import output_stems, output_urls

BUCKET = "hostile"
pytestmark = pytest.mark.slow


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(60, 200, (72, 96), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _tiff(seed: int) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.random.default_rng(seed).integers(60, 200, (72, 96), dtype=np.uint8))
    return buf.getvalue()


def _s3_keys(tree: str) -> list[str]:
    """Keys below archive/: escapes by an absolute path into the temp tree, by ``..`` segments up
    to the tree's decoy model, and names that are merely odd."""
    return ["ok.png", f"/{tree.strip('/')}/escaped/abs.png", f"x/../../../{tree.strip('/')}/escaped/dots.png",
            "x/../../../models/fabric/card.png", "x/../../../../escaped/far.png", "..hidden.png",
            "..dir/w.png", "./dot.png", "sp ace/ünï cøde.png", "back\\slash.png", "tab\there.png",
            "a.png", "a.png.tiff", "a.tiff", "%2F.png", "L" * 300 + ".png",
            "deep/" + "d" * 220 + "/" + "e" * 220 + ".png"]


_LOCAL_NAMES = [b"ok.png", b"..hidden.png", b"..dir/w.png", b"sp ace.png", "ünï.png".encode(),
                b"bad\xffname.png", b"back\\slash.png", b"new\nline.png", b"a.png", b"a.png.tiff",
                b"L" * 250 + b".png", b"%2E%2E.png"]


def _tree_files(root: str) -> dict[bytes, str]:
    out = {}
    for d, _, files in os.walk(os.fsencode(root)):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[p] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _bucket(client) -> dict[str, str]:
    objs = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        objs.update({o["Key"]: o["ETag"] for o in page.get("Contents", [])})
    return objs


def _scan(model: str, source: str, out: str, endpoint: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": "", "AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET,
           "AWS_DEFAULT_REGION": "us-east-1", storage.ENDPOINT_ENV: endpoint}
    cmd = [sys.executable, "-m", "ray_inspect.cli", "scan", model, source, out, "--workers", "1"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env,
                          errors="backslashreplace")


def _accounted(out: str, keys: set[str]) -> set[str]:
    """Each key once: scanned to a record of its own below OUT, or in errors.jsonl; the scanned keys."""
    listed = list(manifest_entries(out))
    entries = {e["key"]: e for e in listed}
    assert set(entries) == keys and len(listed) == len(keys)
    log = storage.join(out, "errors.jsonl")
    errors = [json.loads(line) for line in storage.read_text(log).splitlines()] if storage.exists(log) else []
    failed = {e["key"] for e in errors}
    scanned = {k for k, e in entries.items() if e["status"] == "ok"}
    assert scanned | failed == keys and not scanned & failed, (scanned, errors)
    stems = output_stems(sorted(keys))
    assert len(set(stems.values())) == len(keys)
    for k in scanned:
        record = output_urls(out, stems[k])["record"]
        assert storage.contains(out, record) and json.loads(storage.read_text(record))["key"] == k
    return scanned


@pytest.fixture(scope="module")
def moto():
    with moto_server(BUCKET) as endpoint:
        yield endpoint


def test_hostile_s3_keys_stay_below_a_local_out(calibrated, moto, tmp_path):
    tree = str(tmp_path / "tree")
    os.makedirs(f"{tree}/models/fabric")
    with open(f"{tree}/models/fabric/card.json", "w") as f:
        f.write("{}")
    client = _client(moto, KEY, SECRET)
    keys = _s3_keys(tree)
    for i, k in enumerate(keys):
        body = _tiff(i) if k.endswith(".tiff") else _png(i)
        client.put_object(Bucket=BUCKET, Key="archive/" + k, Body=body)
    client.put_object(Bucket=BUCKET, Key="models/fabric/card.json", Body=b"{}")
    before_tree, before_bucket = _tree_files(tree), _bucket(client)

    out = f"{tree}/out"
    r = _scan(calibrated[0], f"s3://{BUCKET}/archive", out, moto)
    assert r.returncode in (0, 3) and "Traceback" not in r.stderr, r.stderr[-3000:]
    after = _tree_files(tree)
    assert {p: h for p, h in after.items() if not p.startswith(os.fsencode(out + "/"))} == before_tree
    assert _bucket(client) == before_bucket
    assert _accounted(out, set(keys)) == set(keys)         # every one of them is a readable image


def test_odd_local_names_stay_below_an_s3_out(calibrated, moto, tmp_path, monkeypatch):
    src = tmp_path / "src"
    for i, name in enumerate(_LOCAL_NAMES):
        path = os.path.join(os.fsencode(src), name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(_tiff(i) if name.endswith(b".tiff") else _png(i))
    client = _client(moto, KEY, SECRET)
    before_tree, before_bucket = _tree_files(str(tmp_path)), _bucket(client)

    out = f"s3://{BUCKET}/out-local"
    r = _scan(calibrated[0], str(src), out, moto)
    assert r.returncode in (0, 3) and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert _tree_files(str(tmp_path)) == before_tree
    assert {k: e for k, e in _bucket(client).items() if not k.startswith("out-local/")} == before_bucket
    env = {"AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET, storage.ENDPOINT_ENV: moto}
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    names = {os.fsdecode(n) for n in _LOCAL_NAMES}
    assert _accounted(out, names) == names
