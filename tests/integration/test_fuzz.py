"""A seeded fuzz corpus in an archive: 320 mutations (truncations, bit flips, header edits) of
valid PNG, JPEG, TIFF and BMP files beside the originals. The real command finishes, every file is
accounted for once (scanned, or in errors.jsonl), and the terminal shows no traceback."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tifffile
from PIL import Image

from helpers.bombs import png_bytes
from ray_inspect.distributed.scan import manifest_entries

pytestmark = pytest.mark.slow
MUTATIONS = 320


def originals() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (64, 80), dtype=np.uint8)
    colour = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
    out = {"deep.png": png_bytes(colour.astype(np.uint16) * 257)}
    pillow = [("grey.png", grey, "PNG", {}), ("colour.png", colour, "PNG", {}),
              ("grey.jpg", grey, "JPEG", {}), ("colour.jpg", colour, "JPEG", {"quality": 90}),
              ("grey.bmp", grey, "BMP", {}), ("colour.bmp", colour, "BMP", {})]
    for name, arr, fmt, kw in pillow:
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format=fmt, **kw)
        out[name] = buf.getvalue()
    for name, arr, kw in [("zlib.tiff", grey, {"compression": "zlib"}), ("plain.tiff", grey, {}),
                          ("pages.tiff", np.stack([grey, grey, grey]), {})]:
        buf = io.BytesIO()
        tifffile.imwrite(buf, arr, **kw)
        out[name] = buf.getvalue()
    return out


def mutate(data: bytes, rng: np.random.Generator) -> tuple[str, bytes]:
    d = bytearray(data)
    op = int(rng.integers(0, 3))
    if op == 0:
        return "cut", bytes(d[: int(rng.integers(0, len(d)))])
    if op == 1:
        for _ in range(int(rng.integers(1, 9))):
            d[int(rng.integers(0, len(d)))] ^= 1 << int(rng.integers(0, 8))
        return "flip", bytes(d)
    i = int(rng.integers(0, 60))
    d[i : i + 4] = rng.integers(0, 256, 4, dtype=np.uint8).tobytes()
    return "head", bytes(d)


def test_a_fuzzed_archive_is_scanned_to_the_end_with_every_file_accounted_once(calibrated, tmp_path):
    src = tmp_path / "archive"
    src.mkdir()
    base = originals()
    for name, data in base.items():
        (src / name).write_bytes(data)
    rng = np.random.default_rng(20261202)
    names = sorted(base)
    for k in range(MUTATIONS):
        name = names[int(rng.integers(0, len(names)))]
        op, data = mutate(base[name], rng)
        (src / f"{k:03d}-{op}-{name}").write_bytes(data)
    files = sorted(p.name for p in src.iterdir())

    env = {**os.environ, "RAY_ADDRESS": ""}
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "ray_inspect.cli", "scan", calibrated[0], str(src), str(out), "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 3, r.stderr[-3000:]
    assert "Traceback" not in r.stderr + r.stdout
    summary = json.loads(r.stdout)
    errors = [json.loads(line) for line in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    failed = [e["key"] for e in errors]
    scanned = [e["key"] for e in manifest_entries(str(tmp_path / "out")) if e["status"] == "ok"]
    assert sorted(scanned + failed) == files                           # each file once, none twice
    assert set(base) <= set(scanned)                                   # the originals all scan
    assert summary["scanned"] == len(scanned) and summary["failed"] == len(failed)
    assert {e["kind"] for e in errors} <= {"corrupt", "empty", "format", "size", "mode", "range", "nan"}
    records = list((tmp_path / "out" / "records").glob("*.json"))
    assert len(records) == len(scanned)
