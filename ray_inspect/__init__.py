"""ray-inspect: unsupervised defect segmentation with the SSIM autoencoder of Bergmann et al. (2019).

Public API for notebooks and the Ray layers; everything here runs without Ray.
"""

__version__ = "0.1.0"

from .artifact import load_model  # noqa: E402
from .inference import reconstruct  # noqa: E402
from .metrics import PixelROC, au_pro, image_auroc  # noqa: E402
from .ssim import ssim_maps  # noqa: E402

__all__ = ["ssim_maps", "load_model", "reconstruct", "PixelROC", "au_pro", "image_auroc", "__version__"]
