"""Reports on a scan's output: a summary table, ROC/PRO plots and overlays of the worst images."""

from __future__ import annotations

import io
import json

import matplotlib
import numpy as np
import tifffile

from ray_inspect.core.metrics import PixelROC
from ray_inspect.io import storage
from ray_inspect.io.images import read_image, read_mask
from ray_inspect.records import ImageRecord, InputError
from ray_inspect.steps.imagescan import output_urls

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - pyplot once the non-interactive backend is chosen

OVERLAY_MAX_PIXELS = 4096 * 4096   # larger images are not drawn (a figure could not show them anyway)
SUMMARY_KEYS = ("pixel_auroc", "au_pro", "image_auroc", "pixel_auroc_opened", "au_pro_opened")


def load_records(out: str, fingerprint: str | None = None) -> tuple[list[ImageRecord], int]:
    """The records below OUT/records that carry the scan's ``fingerprint`` (all, when None), and how
    many others it left out: records of an earlier scan with other settings, or unreadable ones."""
    base = storage.join(out, "records")
    if not storage.exists(base):
        return [], 0
    kept, ignored = [], 0
    for url in (u for u in storage.find(base) if u.endswith(".json")):
        try:
            rec = ImageRecord.from_json(storage.read_text(url))
        except (ValueError, KeyError, TypeError, storage.StorageError):
            ignored += 1
            continue
        if fingerprint is None or rec.fingerprint == fingerprint:
            kept.append(rec)
        else:
            ignored += 1
    return kept, ignored


def load_report(out: str) -> dict:
    """metrics.json and manifest.json of a scan, merged into one dict."""
    if not storage.exists(storage.join(out, "_SUCCESS")):
        raise FileNotFoundError(f"{out}: no finished scan here (no _SUCCESS marker)")
    manifest = json.loads(storage.read_text(storage.join(out, "manifest.json")))
    metrics = {}
    if storage.exists(storage.join(out, "metrics.json")):
        metrics = json.loads(storage.read_text(storage.join(out, "metrics.json")))
    return {**{k: metrics.get(k) for k in SUMMARY_KEYS}, "metrics": metrics, "scan": manifest}


def summary_table(rep: dict) -> str:
    scan = rep["scan"]
    rows = [("images", f"{scan['images']} ({scan['scanned']} scanned, {scan.get('skipped', 0)} already done, "
                       f"{scan['failed']} failed)")]
    names = {"pixel_auroc": "pixel AUROC", "au_pro": "AU-PRO (FPR<=0.3)", "image_auroc": "image AUROC",
             "pixel_auroc_opened": "pixel AUROC, opened", "au_pro_opened": "AU-PRO, opened"}
    for k, label in names.items():
        if rep.get(k) is not None:
            rows.append((label, f"{rep[k]:.4f}"))
    if scan.get("threshold") is not None:
        rows.append(("threshold", f"{scan['threshold']:.5g}"))
    if scan.get("storage_retries"):
        rows.append(("retries", f"{scan['storage_retries']} object-storage request(s) retried"))
    if rep.get("ignored_records"):
        rows.append(("ignored", f"{rep['ignored_records']} record(s) of other scans, unreadable, or of "
                                "inputs gone"))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{a:<{width}}  {b}" for a, b in rows)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def roc_figure(raw: PixelROC, opened: PixelROC | None, fpr_limit: float = 0.3) -> bytes:
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4.4))
    for roc, name in ((raw, "residual"), (opened, "after opening")):
        if roc is None:
            continue
        fpr, tpr, _ = roc.curve()
        a.plot(fpr, tpr, label=f"{name} (AUROC {roc.auroc():.3f})")
        if roc.regions:
            f, p = roc.pro_curve()
            b.plot(f, p, label=f"{name} (AU-PRO {roc.au_pro(fpr_limit):.3f})")
    a.plot([0, 1], [0, 1], "k:", lw=0.8)
    a.set(xlabel="false-positive rate (good pixels)", ylabel="true-positive rate (defect pixels)",
          title="pixel ROC")
    b.axvline(fpr_limit, color="k", ls=":", lw=0.8)
    b.set(xlabel="false-positive rate", ylabel="per-region overlap", xlim=(0, min(1, 2 * fpr_limit)),
          title="PRO")
    a.legend(loc="lower right")
    b.legend(loc="lower right")
    return _png(fig)


def overlay_figure(record: ImageRecord, out: str) -> bytes:
    """Input with predicted mask (red) and ground truth (green outline) at the image's stored size,
    beside the score map (at processing scale)."""
    urls = output_urls(out, record.stem)
    img = read_image(record.url, 1)
    residual = tifffile.imread(io.BytesIO(storage.read_bytes(urls["residual"]))).astype(np.float32)
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 4.6))
    a.imshow(img, cmap="gray", vmin=0, vmax=1)
    mask_url = urls["mask"]
    if storage.exists(mask_url):
        m = read_image(mask_url, 1) > 0.5
        a.imshow(np.ma.masked_where(~m, m), cmap="autumn", alpha=0.45)
    if record.mask_url:
        gt = read_mask(record.mask_url, img.shape)
        a.contour(gt, levels=[0.5], colors="lime", linewidths=1)
    a.set_title(f"{record.key}  score {record.score:.3f}", fontsize=9)
    im = b.imshow(residual, cmap="inferno")
    b.set_title("score map", fontsize=9)
    fig.colorbar(im, ax=b, fraction=0.046)
    for ax in (a, b):
        ax.axis("off")
    return _png(fig)


def _write_overlays(out: str, records: list[ImageRecord], worst: int) -> tuple[list[str], int]:
    """Overlays of the ``worst`` highest-scoring images that can still be drawn; returns the URLs
    written and how many records were passed over because their input or map is gone."""
    written, gone = [], 0
    drawable = [r for r in records if r.height * r.width <= OVERLAY_MAX_PIXELS]
    for rec in sorted(drawable, key=lambda r: -r.score):
        if len(written) == worst:
            break
        try:
            figure = overlay_figure(rec, out)
        except (InputError, OSError):         # StorageError and FileNotFoundError are OSErrors
            gone += 1
            continue
        name = storage.cap_name(f"{len(written):02d}_" + rec.stem.replace("/", "_"))
        url = storage.join(out, "overlays", name + ".png")
        storage.write_bytes(url, figure)
        written.append(url)
    return written, gone


def write_report(out: str, worst: int = 5) -> dict:
    """Write roc.png and overlays of the ``worst`` highest-scoring images of this scan (records of
    other scans in OUT are left out and counted); return the summary."""
    rep = load_report(out)
    written = []
    if storage.exists(storage.join(out, "stats", "roc.npz")):
        raw = PixelROC.from_bytes(storage.read_bytes(storage.join(out, "stats", "roc.npz")))
        opened_url = storage.join(out, "stats", "roc_opened.npz")
        opened = PixelROC.from_bytes(storage.read_bytes(opened_url)) if storage.exists(opened_url) else None
        if raw.defect.sum() and raw.good.sum():
            storage.write_bytes(storage.join(out, "roc.png"), roc_figure(raw, opened))
            written.append(storage.join(out, "roc.png"))
    records, ignored = load_records(out, rep["scan"].get("scan_fingerprint"))
    overlays, gone = _write_overlays(out, records, worst)
    rep["written"], rep["ignored_records"] = written + overlays, ignored + gone
    return rep
