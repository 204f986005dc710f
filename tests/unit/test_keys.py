"""Files of keys: plain text and the S3 Inventory CSV layout, read as streams; each key's version."""

import csv
import gzip
import io

from PIL import Image

from ray_inspect.io import storage
from ray_inspect.io.keys import keyed_samples, read_keys


def _images(root, *keys):
    for k in keys:
        (root / k).parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (4, 4)).save(root / k)


def test_text_keys_skip_blanks_and_comments_and_keep_odd_names(tmp_path):
    path = tmp_path / "keys.txt"
    path.write_text("# tonight\na.png\n\nsub/b c.png\n  lead.png\r\n", encoding="utf-8")
    assert list(read_keys(str(path), "s3://bucket/prefix")) == ["a.png", "sub/b c.png", "  lead.png"]


def test_inventory_csv_keys_are_url_decoded_and_made_relative_to_the_source(tmp_path):
    rows = [["bucket", "prefix/a%20b.png", "12", "2026-12-01T00:00:00.000Z"],
            ["bucket", "prefix/sub/c%2Bd.png", "9", "x"],
            ["bucket", "other/e.png", "9", "x"]]
    buf = io.StringIO()
    csv.writer(buf, quoting=csv.QUOTE_ALL).writerows(rows)
    plain, packed = tmp_path / "inv.csv", tmp_path / "inv.csv.gz"
    plain.write_text(buf.getvalue())
    packed.write_bytes(gzip.compress(buf.getvalue().encode()))
    expected = ["a b.png", "sub/c+d.png", "../other/e.png"]
    assert list(read_keys(str(plain), "s3://bucket/prefix")) == expected
    assert list(read_keys(str(packed), "s3://bucket/prefix/")) == expected
    assert list(read_keys(str(plain), "s3://bucket")) == [k.replace("%20", " ").replace("%2B", "+")
                                                         for _, k, *_ in rows]


def test_keyed_samples_carry_the_listing_s_version_or_say_what_is_wrong(tmp_path):
    src = tmp_path / "src"
    _images(src, "a.png", "d/b.png")
    keys = ["d/b.png", "missing.png", "a.png", "../escape.png", "d"]
    out = list(keyed_samples(str(src), iter(keys)))
    assert [s.key for s, _ in out] == keys                      # the file's order
    listed = dict(storage.iter_versions(str(src)))
    (b, ok_b), (_, missing), (a, ok_a), (_, escape), (_, folder) = out
    assert ok_a is ok_b is None and a.version == listed[a.url] and b.version == listed[b.url]
    assert "no such file" in missing and escape == "not below the source" and folder
    assert not a.labelled


def test_keyed_samples_of_an_mvtec_root_have_their_ground_truth(dataset):
    (sample, problem), = keyed_samples(dataset, iter(["test/cut/000.png"]))
    assert problem is None and sample.defect_type == "cut"
    assert sample.mask_url.endswith("ground_truth/cut/000_mask.png")
