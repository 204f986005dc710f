"""Data sets in the MVTec AD layout, or any prefix of images, listed from a local path or URL."""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from dataclasses import dataclass

from ray_inspect.io import storage
from ray_inspect.io.images import IMAGE_FORMATS, is_image


@dataclass(frozen=True)
class Sample:
    """One image to inspect: its URL, its path relative to the source, and its ground truth if known."""

    url: str
    key: str                       # relative path below the source root, e.g. test/cut/003.png
    defect_type: str | None = None  # "good" for defect-free, None when unlabelled
    mask_url: str | None = None     # expected mask for a defective image of an MVTec root
    version: str = ""               # size and ETag/mtime of the input when listed

    @property
    def listed_bytes(self) -> int | None:
        """The input's size as listed (None when the listing did not say)."""
        size = self.version.split("-", 1)[0]
        return int(size) if size.isdigit() else None

    @property
    def labelled(self) -> bool:
        return self.defect_type is not None

    @property
    def defective(self) -> bool:
        return self.defect_type not in (None, "good")


def is_mvtec_root(url: str) -> bool:
    return storage.isdir(storage.join(url, "test")) and (
        storage.isdir(storage.join(url, "ground_truth")) or storage.isdir(storage.join(url, "train")))


def _images_below(url: str) -> list[str]:
    return [u for u in storage.find(url) if is_image(u)]


def train_images(root: str) -> list[str]:
    """Defect-free training images: ROOT/train/good/*, or every image below ROOT otherwise."""
    good = storage.join(root, "train", "good")
    urls = _images_below(good if storage.isdir(good) else root)
    if not urls:
        raise FileNotFoundError(f"{root}: no training images ({', '.join(IMAGE_FORMATS)}) found")
    return urls


def list_samples(source: str) -> list[Sample]:
    """Test images of an MVTec root (with ground truth) or every image below a prefix (unlabelled)."""
    return list(iter_samples(source))


def iter_samples(source: str) -> Iterator[Sample]:
    """``list_samples`` as the listing arrives, page by page, in key order (memory does not grow
    with the source)."""
    root = source if not is_mvtec_root(source) else storage.join(source, "test")
    head = None
    for url, version in storage.iter_versions(root):
        if not is_image(url):
            continue
        if head is None:                       # the listing's URLs all start like the first one's
            rel = storage.relative(url, root)
            head = url[: len(url) - len(rel)]
        rel = url[len(head):] if url.startswith(head) else storage.relative(url, root)
        if root == source:
            yield Sample(url, rel, version=version)
        else:
            yield mvtec_sample(source, rel, url, version)


def mvtec_sample(source: str, rel: str, url: str, version: str = "") -> Sample:
    """The sample of ``test/<rel>`` of an MVTec root, with the mask that belongs to it."""
    defect = rel.split("/", 1)[0] if "/" in rel else "good"
    mask = None
    if defect != "good":
        stem = posixpath.splitext(posixpath.basename(rel))[0]
        sub = posixpath.dirname(rel.split("/", 1)[1]) if rel.count("/") > 1 else ""
        mask = storage.join(source, "ground_truth", defect, sub, f"{stem}_mask.png") if sub else \
            storage.join(source, "ground_truth", defect, f"{stem}_mask.png")
    return Sample(url, "test/" + rel, defect, mask, version)


def defect_free(source: str) -> list[str]:
    """Defect-free validation images for calibration: ROOT/validation/good of an MVTec-style root,
    or every image below a prefix. Test images are never used, so thresholds are not fitted to them."""
    val = storage.join(source, "validation", "good")
    if storage.isdir(val):
        return _images_below(val)
    if is_mvtec_root(source):
        raise FileNotFoundError(f"{source}: no validation/good folder; pass a folder of defect-free "
                                "validation images (not the test set)")
    return _images_below(source)
