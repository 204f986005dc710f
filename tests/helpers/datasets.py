"""Synthetic data sets for fixtures."""

from __future__ import annotations

from ray_inspect.config import SynthConfig
from ray_inspect.io.synth import generate


def synth_root(tmp_path_factory, folder: str, cfg: SynthConfig) -> str:
    """A synthetic plain-weave MVTec root made with ``cfg`` in a new temporary ``folder``."""
    root = str(tmp_path_factory.mktemp(folder) / "plain")
    generate(root, cfg)
    return root
