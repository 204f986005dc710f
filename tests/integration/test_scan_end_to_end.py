"""The per-image step, the scan with bad inputs, calibration and the report."""

import io
import json
import shutil

import numpy as np
import pytest
import tifffile
from PIL import Image
from sklearn.metrics import roc_auc_score

from helpers import bombs
from ray_inspect import load_model
from ray_inspect.config import InspectConfig, ScoreConfig
from ray_inspect.distributed.scan import EXIT_PARTIAL, scan
from ray_inspect.io.datasets import list_samples
from ray_inspect.io.images import read_image
from ray_inspect.report import write_report
from ray_inspect.steps.calibrate import calibrate
from ray_inspect.steps.inspector import Inspector


def test_calibration_thresholds_hold_on_validation_images(calibrated, dataset):
    url, t = calibrated
    model = load_model(url)
    assert model.card.threshold == t and model.card.threshold_rule["min_area"] == 30
    insp = Inspector(model, model.card, InspectConfig(precision="float32"))
    from skimage.measure import label

    from ray_inspect.io.datasets import defect_free

    for u in defect_free(dataset):
        res = insp.inspect(read_image(u), u)
        lab = label(res.mask, connectivity=2)
        assert lab.max() == 0 or np.bincount(lab.ravel())[1:].max() < 30


def test_fpr_rule_through_the_model(trained_model, dataset):
    res = calibrate(trained_model, dataset, fpr=0.01, write=False)
    assert res["rule"] == "fpr" and res["threshold"] > 0


def bad_corpus(root):
    """Add every kind of bad input to a copy of an MVTec root."""
    (root / "test" / "good" / "zero.png").write_bytes(b"")
    (root / "test" / "good" / "text.png").write_bytes(b"hello, I am not a PNG")
    good = (root / "test" / "good" / "000.png").read_bytes()
    (root / "test" / "good" / "truncated.png").write_bytes(good[: len(good) // 3])
    shutil.copy(root / "test" / "cut" / "000.png", root / "test" / "cut" / "nomask.png")
    shutil.copy(root / "test" / "cut" / "000.png", root / "test" / "cut" / "badmask.png")
    buf = io.BytesIO()
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(buf, format="PNG")
    (root / "ground_truth" / "cut" / "badmask_mask.png").write_bytes(buf.getvalue())
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.full((300, 300), np.nan, np.float32))
    (root / "test" / "good" / "nan.tiff").write_bytes(buf.getvalue())
    buf = io.BytesIO()
    Image.fromarray(np.full((60, 40), 128, np.uint8)).save(buf, format="PNG")
    (root / "test" / "good" / "small.png").write_bytes(buf.getvalue())   # smaller than a window: padded, fine
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 300), 128, np.uint8)).save(buf, format="PNG")
    (root / "test" / "good" / "sliver.png").write_bytes(buf.getvalue())  # thinner than the SSIM window
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.zeros((200, 200, 5), np.uint8), photometric="minisblack", planarconfig="contig")
    (root / "test" / "good" / "five.tiff").write_bytes(buf.getvalue())   # five channels
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.ones((200, 200), np.complex64))
    (root / "test" / "good" / "complex.tiff").write_bytes(buf.getvalue())
    (root / "test" / "good" / "dir.png").mkdir()                          # a folder named like an image
    (root / "test" / "good" / "bomb.png").write_bytes(bombs.png_bomb())
    (root / "test" / "good" / "bomb.jpg").write_bytes(bombs.jpeg_bomb())
    (root / "test" / "good" / "bomb.tiff").write_bytes(bombs.tiff_bomb(pages=100))
    (root / "test" / "good" / "eps.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n")
    Image.open(root / "test" / "good" / "000.png").save(root / "test" / "good" / "cam.bmp")   # scanned
    return {"bomb.png": "Mpx", "bomb.jpg": "Mpx", "bomb.tiff": "Mpx", "eps.png": "accepted format",
            "zero.png": "empty", "text.png": "not an image", "truncated.png": "corrupt",
            "nomask.png": "no such file", "badmask.png": "mask is 10x10", "nan.tiff": "NaN",
            "sliver.png": "too small", "five.tiff": "5 samples per pixel",
            "complex.tiff": "unsupported pixel type"}


def test_scan_records_bad_inputs_and_goes_on(ray_session, calibrated, dataset, tmp_path):
    url, t = calibrated
    root = tmp_path / "data"
    shutil.copytree(dataset, root)
    expected = bad_corpus(root)
    out = tmp_path / "out"
    summary = scan(url, str(root), str(out), InspectConfig(precision="float32"))
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    by_name = {e["key"].rsplit("/", 1)[-1]: e for e in errors}
    assert set(by_name) == set(expected)
    for name, fragment in expected.items():
        assert fragment in by_name[name]["reason"], (name, by_name[name])
    assert {by_name[n]["kind"] for n in ("bomb.png", "bomb.jpg", "bomb.tiff")} == {"size"}
    assert by_name["eps.png"]["kind"] == "format"
    n_good_files = len(list_samples(str(root))) - len(expected)
    assert summary["scanned"] == n_good_files and summary["failed"] == len(expected)
    assert summary["exit_code"] == EXIT_PARTIAL
    assert (out / "_SUCCESS").exists() and (out / "masks" / "test" / "good" / "small.png").exists()
    rec = json.loads((out / "records" / "test" / "cut" / "000.json").read_text())
    assert rec["status"] == "ok" and rec["tiles"] > 0 and set(rec["timings"]) >= {"read", "inference"}


def test_scan_metrics_agree_with_sklearn_and_report(ray_session, calibrated, dataset, tmp_path):
    url, _ = calibrated
    out = tmp_path / "out"
    summary = scan(url, dataset, str(out), InspectConfig(precision="float32"))
    assert summary["exit_code"] == 0 and summary["failed"] == 0
    m = json.loads((out / "metrics.json").read_text())
    model = load_model(url)
    insp = Inspector(model, model.card, InspectConfig(precision="float32"))
    scores, labels, img_scores, img_labels = [], [], [], []
    for s in list_samples(dataset):
        img, gt = insp.load(s)
        res = insp.inspect(img, s.key)
        scores.append(res.residual.ravel())
        labels.append(gt.ravel())
        img_scores.append(res.score)
        img_labels.append(gt.any())
        mask = np.asarray(Image.open(out / "masks" / s.key.replace(".png", ".png"))) > 0
        np.testing.assert_array_equal(mask, res.mask)   # the scan wrote exactly the per-image result
    ref = roc_auc_score(np.concatenate(labels), np.concatenate(scores))
    assert abs(m["pixel_auroc"] - ref) <= 1e-3
    assert abs(m["image_auroc"] - roc_auc_score(img_labels, img_scores)) <= 1e-9
    assert 0 <= m["au_pro"] <= 1 and "pixel_auroc_opened" in m
    rep = write_report(str(out), worst=2)
    assert rep["pixel_auroc"] == m["pixel_auroc"]
    assert (out / "roc.png").stat().st_size > 1000 and len(list((out / "overlays").iterdir())) == 2


@pytest.mark.parametrize("score", [ScoreConfig(4.0, "position"),
                                   ScoreConfig(3.0, "features", adapt_contrast=0.5)])
def test_a_normalised_score_runs_through_the_ray_scan_as_through_one_process(ray_session, trained_model,
                                                                            dataset, tmp_path, score):
    url = str(tmp_path / "model")
    shutil.copytree(trained_model, url)
    calibrate(url, dataset, fpr=0.01, cfg=InspectConfig(precision="float32"), score=score)
    out = tmp_path / "out"
    summary = scan(url, dataset, str(out), InspectConfig(precision="float32"))
    assert summary["exit_code"] == 0 and summary["failed"] == 0
    model = load_model(url)
    assert model.card.score == score and model.normaliser is not None
    insp = Inspector(model, model.card, InspectConfig(precision="float32"), stats=model.normaliser)
    for s in list_samples(dataset)[::7]:
        img, _ = insp.load(s)
        res = insp.inspect(img, s.key)
        tiff = out / "residuals" / s.key.replace(".png", ".tiff")
        stored = tifffile.imread(io.BytesIO(tiff.read_bytes()))                 # the score, as float16
        np.testing.assert_allclose(stored, res.residual, rtol=1e-3, atol=1e-3)
        np.testing.assert_array_equal(np.asarray(Image.open(out / "masks" / s.key)) > 0, res.mask)


def test_unlabelled_prefix_and_bfloat16(ray_session, calibrated, dataset, tmp_path):
    url, _ = calibrated
    src = tmp_path / "prefix" / "line1"
    shutil.copytree(f"{dataset}/test/cut", src)
    out = tmp_path / "out"
    summary = scan(url, str(tmp_path / "prefix"), str(out), InspectConfig(precision="bfloat16"))
    assert summary["scanned"] == len(list(src.iterdir())) and "metrics" not in summary
    assert (out / "masks" / "line1" / "000.png").exists() and not (out / "metrics.json").exists()
    # report on an unlabelled scan: the counts, no metrics, overlays of the highest scores
    rep = write_report(str(out), worst=2)
    assert rep["pixel_auroc"] is None and rep["metrics"] == {}
    assert rep["scan"]["scanned"] == summary["scanned"]
    assert len(list((out / "overlays").iterdir())) == 2 and not (out / "roc.png").exists()


def test_report_of_an_unfinished_scan_is_one_line(ray_session, calibrated, dataset, tmp_path):
    import subprocess
    import sys

    url, _ = calibrated
    out = tmp_path / "out"
    scan(url, dataset, str(out), InspectConfig(precision="float32"))
    (out / "_SUCCESS").unlink()                                 # as a scan stopped before its end leaves it
    r = subprocess.run([sys.executable, "-m", "ray_inspect.cli", "report", str(out)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == f"ray-inspect: error: {out}: no finished scan here (no _SUCCESS marker)"


def test_an_out_inside_the_source_is_not_scanned_and_a_source_inside_out_is_refused(ray_session, calibrated,
                                                                                     dataset, tmp_path):
    import subprocess
    import sys

    import pytest

    url, _ = calibrated
    src = tmp_path / "src"
    shutil.copytree(f"{dataset}/test/good", src)
    n = len(list(src.glob("*.png")))
    out = src / "nightly"                                      # results kept beside the archive
    for _ in range(2):                                         # the rerun lists the outputs of the first
        summary = scan(url, str(src), str(out), InspectConfig(precision="float32"))
        assert summary["images"] == n and summary["failed"] == 0
    assert len(list((out / "records").rglob("*.json"))) == n
    with pytest.raises(ValueError, match="inside the scan's output"):
        scan(url, str(out / "residuals"), str(out), InspectConfig(precision="float32"))
    before = sorted(p.stat().st_mtime_ns for p in out.rglob("*"))
    r = subprocess.run([sys.executable, "-m", "ray_inspect.cli", "scan", url, str(out), str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "inside the scan's output" in r.stderr
    assert sorted(p.stat().st_mtime_ns for p in out.rglob("*")) == before
