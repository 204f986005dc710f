"""The patch store: prepare replaces only a store it made, never the data set or what holds it."""

import os

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ray_inspect.cli import main
from ray_inspect.config import PrepareConfig
from ray_inspect.io.patches import is_patch_store, open_patches, prepare

CFG = PrepareConfig(patches=4, chunk=4, short_side=None, seed=0)


@pytest.fixture()
def dataset(tmp_path):
    root = tmp_path / "data"
    (root / "train" / "good").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        img = rng.integers(0, 255, (160, 170), dtype=np.uint8)
        Image.fromarray(img).save(root / "train" / "good" / f"{i}.png")
    return root


def _tree(root):
    return sorted((p, os.path.getsize(os.path.join(p, f))) for p, _, fs in os.walk(root) for f in fs)


def test_a_store_prepare_made_is_replaced(dataset, tmp_path):
    out = str(tmp_path / "p.zarr")
    first = prepare(str(dataset), out, CFG)
    assert is_patch_store(out) and not is_patch_store(str(dataset))
    again = prepare(str(dataset), out, PrepareConfig(patches=8, chunk=4, short_side=None, seed=1))
    assert open_patches(out).shape[0] == 8 and again["fingerprint"] != first["fingerprint"]
    (tmp_path / "empty").mkdir()
    prepare(str(dataset), str(tmp_path / "empty"), CFG)          # an empty folder is taken
    assert is_patch_store(str(tmp_path / "empty"))


@pytest.mark.parametrize("where", ["the data set", "inside it", "its parent", "a link to it", "other files",
                                   "a file"])
def test_prepare_refuses_and_removes_nothing(dataset, tmp_path, where):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    (tmp_path / "report.pdf").write_bytes(b"%PDF")
    (tmp_path / "link").symlink_to(dataset)
    out = {"the data set": dataset, "inside it": dataset / "train" / "p.zarr", "its parent": tmp_path,
           "a link to it": tmp_path / "link", "other files": tmp_path / "notes",
           "a file": tmp_path / "report.pdf"}[where]
    before = _tree(tmp_path)
    res = CliRunner().invoke(main, ["prepare", str(dataset), str(out), "--patches", "4",
                                    "--short-side", "none"])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and str(out) in lines[0] and "Traceback" not in res.output
    assert _tree(tmp_path) == before
