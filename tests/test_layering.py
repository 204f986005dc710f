"""The method core runs in a notebook or any Ray worker: it imports neither Ray nor click."""

import subprocess
import sys

CORE = ["model", "ssim", "tiling", "inference", "segmentation", "metrics", "train", "pipeline", "imagescan",
        "evaluation", "patches", "calibrate", "report", "synth"]


def test_core_imports_neither_ray_nor_click():
    code = ("import sys\n" + "".join(f"import ray_inspect.{m}\n" for m in CORE) +
            "bad = [m for m in ('ray', 'click') if m in sys.modules]\nassert not bad, bad\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
