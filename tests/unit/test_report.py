"""The report of a scan: only this scan's records, and an OUT with stale ones still reports."""

import json

import numpy as np
import tifffile
from PIL import Image

from ray_inspect.io import storage
from ray_inspect.records import ImageRecord
from ray_inspect.report import summary_table, write_report
from ray_inspect.steps.imagescan import output_urls

CURRENT, OLD = "current0fingerpr", "earlier0fingerpr"


def _record(tmp_path, key: str, fingerprint: str, score: float) -> ImageRecord:
    """An image of the source, its residual map under OUT and its record."""
    src = tmp_path / "src" / key
    src.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((16, 24), 128, np.uint8)).save(src)
    stem = key.rsplit(".", 1)[0]
    rec = ImageRecord(key=key, stem=stem, url=str(src), version="1", status="ok", fingerprint=fingerprint,
                      defect_type=None, mask_url=None, score=score, height=16, width=24, tiles=1, bands=1,
                      threshold=None, bytes_read=1, max_rss_bytes=1)
    urls = output_urls(str(tmp_path / "out"), stem)
    storage.write_bytes(urls["residual"], _tiff(np.full((16, 24), score, np.float16)))
    storage.write_text(urls["record"], rec.to_json())
    return rec


def _tiff(arr) -> bytes:
    import io

    buf = io.BytesIO()
    tifffile.imwrite(buf, arr)
    return buf.getvalue()


def test_stale_unreadable_and_orphaned_records_are_left_out_and_counted(tmp_path):
    out = tmp_path / "out"
    _record(tmp_path, "a.png", CURRENT, 0.9)
    _record(tmp_path, "b.png", CURRENT, 0.5)
    gone = _record(tmp_path, "c.png", CURRENT, 0.95)          # the highest score: its input is deleted
    _record(tmp_path, "old.png", OLD, 2.0)                    # an earlier scan with other settings
    (tmp_path / "src" / "c.png").unlink()
    (out / "records" / "broken.json").write_text('{"key": ')  # a record cut short
    (out / "manifest.json").write_text(json.dumps({"scan_fingerprint": CURRENT, "images": 3, "scanned": 3,
                                                   "failed": 0}))
    (out / "_SUCCESS").write_text("")
    rep = write_report(str(out), worst=5)
    overlays = sorted(p.name for p in (out / "overlays").iterdir())
    assert overlays == ["00_a.png", "01_b.png"]                # this scan's, highest score first
    assert rep["ignored_records"] == 3                         # old.png, broken.json, c.png (input gone)
    assert gone.key not in "".join(rep["written"])
    assert "ignored" in summary_table(rep) and "3 record(s)" in summary_table(rep)


def test_summary_table_shows_retried_storage_requests_only_when_there_were_some():
    scan = {"images": 4, "scanned": 4, "failed": 0, "threshold": None}
    assert "retries" not in summary_table({"scan": {**scan, "storage_retries": 0}})
    table = summary_table({"scan": {**scan, "storage_retries": 7}})
    assert table.splitlines()[-1].split() == ["retries", "7", "object-storage", "request(s)", "retried"]
