"""Comparing two scans' outputs byte for byte."""

from __future__ import annotations

from ray_inspect.io import storage
from ray_inspect.io.datasets import list_samples
from ray_inspect.steps.imagescan import output_stems, output_urls


def assert_outputs_equal(out_a: str, out_b: str, stems) -> None:
    """Every stem's mask and residual map are the same bytes in both OUTs."""
    for stem in stems:
        a, b = output_urls(out_a, stem), output_urls(out_b, stem)
        assert storage.read_bytes(a["mask"]) == storage.read_bytes(b["mask"]), stem
        assert storage.read_bytes(a["residual"]) == storage.read_bytes(b["residual"]), stem


def output_stem_list(source: str) -> list[str]:
    """The output stems of every image of ``source``."""
    return list(output_stems([s.key for s in list_samples(source)]).values())
