"""The resume ledger: compact objects of completed images, read back as digests, merged when fragmented."""

import json

import numpy as np

from ray_inspect.io import ledger as ledger_mod
from ray_inspect.io import storage
from ray_inspect.io.ledger import Ledger


def _entries(n, start=0):
    return [(f"k/{i:06d}.png", f"{i}-etag{i}", f"k/{i:06d}") for i in range(start, start + n)]


def test_entries_read_back_by_key_and_version_only(tmp_path):
    out = str(tmp_path / "out")
    first = Ledger(out, "fp1")
    first.append(_entries(3))
    first.append([])                                   # nothing: no object
    first.append(_entries(2, start=3))
    assert first.objects == 2 and first.entries == 5
    again = Ledger(out, "fp1")
    assert again.load() == 5 and again.objects == 2
    assert ("k/000004.png", "4-etag4") in again
    assert ("k/000004.png", "4-changed") not in again   # a new version of the input is not complete
    assert ("k/000005.png", "5-etag5") not in again
    assert Ledger(out, "fp2").load() == 0               # other settings: another ledger
    lines = (tmp_path / "out" / "ledger" / "fp1").glob("*.jsonl")
    rows = [json.loads(line) for p in sorted(lines) for line in p.read_text().splitlines()]
    assert rows[0] == ["k/000000.png", "0-etag0", "k/000000"]      # for people: key, version, stem


def test_unreadable_lines_are_ignored_and_odd_keys_round_trip(tmp_path):
    out = str(tmp_path / "out")
    odd = [("a\udcff\nb.png", "1-x", "a%FF%0Ab"), ('q"uote.png', "2-y", 'q"uote')]
    Ledger(out, "fp").append(odd)
    storage.write_text(storage.join(out, "ledger", "fp", "broken.jsonl"), 'not json\n["a", 1]\n')
    led = Ledger(out, "fp")
    assert led.load() == 2 and all((k, v) in led for k, v, _ in odd)


def test_digests_match_a_naive_set(tmp_path):
    rng = np.random.default_rng(0)
    keys = [(f"{rng.integers(1 << 40):x}.png", str(rng.integers(100))) for _ in range(3000)]
    led = Ledger(str(tmp_path), "fp")
    led.append((k, v, k) for k, v in keys[:2000])
    led = Ledger(str(tmp_path), "fp")
    led.load()
    naive = set(keys[:2000])
    assert all(((k, v) in led) == ((k, v) in naive) for k, v in keys)


def test_fragments_merge_into_full_objects_without_losing_an_entry(tmp_path, monkeypatch):
    monkeypatch.setattr(ledger_mod, "SEGMENT", 10)
    monkeypatch.setattr(ledger_mod, "SLACK", 2)
    out = str(tmp_path / "out")
    led = Ledger(out, "fp")
    for i in range(0, 45, 3):                          # 15 small objects of 3 entries
        led.append(_entries(3, start=i))
    assert led.objects == 15 and led.fragmented()
    assert led.compact() == 15
    merged = Ledger(out, "fp")
    assert merged.load() == 45 and merged.objects == 5 and not merged.fragmented()
    assert all((k, v) in merged for k, v, _ in _entries(45))
