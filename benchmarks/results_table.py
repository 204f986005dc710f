"""Render benchmarks/quality.jsonl as the markdown table quoted in docs/results.md."""

import json
import sys

NAMES = {"ssim": "SSIM-AE", "l2": "L2-AE", "vae": "VAE", "fm": "FM-AE (random AlexNet)"}


def main(path: str = "benchmarks/quality.jsonl") -> None:
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    print("| texture | variant | pixel AUROC | AU-PRO (≤0.3) | pixel AUROC, opened | AU-PRO, opened "
          "| image AUROC | train time |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['texture']} | {NAMES.get(r['variant'], r['variant'])} | {r['pixel_auroc']:.3f} "
              f"| {r['au_pro']:.3f} | {r['pixel_auroc_opened']:.3f} | {r['au_pro_opened']:.3f} "
              f"| {r['image_auroc']:.3f} | {r['train_seconds'] / 60:.1f} min |")


if __name__ == "__main__":
    main(*sys.argv[1:])
