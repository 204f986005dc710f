"""ray-inspect: unsupervised defect segmentation with the SSIM autoencoder of Bergmann et al. (2019).

Public API for notebooks and the Ray layers; everything here runs without Ray. Names load on first
use, so that importing one layer (``ray_inspect.core``) does not pull in the others.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "ssim_maps": "ray_inspect.core.ssim",
    "reconstruct": "ray_inspect.core.inference",
    "PixelROC": "ray_inspect.core.metrics",
    "au_pro": "ray_inspect.core.metrics",
    "image_auroc": "ray_inspect.core.metrics",
    "load_model": "ray_inspect.io.artifact",
}
__all__ = ["ssim_maps", "load_model", "reconstruct", "PixelROC", "au_pro", "image_auroc", "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'ray_inspect' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
