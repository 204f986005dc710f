"""OUT's lease: one scan at a time, taken over when its holder is gone or silent too long."""

import json
import subprocess
import sys
import time

import pytest

from ray_inspect.io import storage
from ray_inspect.io.lease import LEASE, Lease, LeaseHeld


def _holder(out):
    return json.loads(storage.read_text(storage.join(out, LEASE)))


def test_a_second_scan_is_refused_with_the_holder_named_and_the_lease_is_given_back(tmp_path):
    out = str(tmp_path / "out")
    with Lease(out, stale_after=60, settle=0) as first:
        held = _holder(out)
        assert held["owner"] == first.me.owner and held["pid"] > 0
        named = r"in use by another scan, process \d+ on .* last heartbeat 0 s ago"
        with pytest.raises(LeaseHeld, match=named):
            Lease(out, stale_after=60, settle=0).take()
    assert not storage.exists(storage.join(out, LEASE))
    with Lease(out, stale_after=60, settle=0):                  # free again
        pass


def test_heartbeats_keep_a_lease_fresh_and_a_silent_one_goes_stale(tmp_path):
    out = str(tmp_path / "out")
    first = Lease(out, stale_after=5, settle=0).take()           # heartbeats every 0.5 s
    beat = _holder(out)["heartbeat"]
    time.sleep(1.2)
    assert _holder(out)["heartbeat"] > beat
    first._stop.set()                                            # silent from now on (as if frozen)
    first._thread.join()
    silent = Lease(out, stale_after=60, settle=0)
    silent.me = silent.me.__class__(**{**silent.me.__dict__, "host": "elsewhere"})
    with pytest.raises(LeaseHeld):
        silent.take()
    later = Lease(out, stale_after=5, settle=0, clock=lambda: time.time() + 10)
    later.me = later.me.__class__(**{**later.me.__dict__, "host": "elsewhere"})
    later.take()
    assert later.previous is not None and later.previous.owner == first.me.owner
    assert _holder(out)["owner"] == later.me.owner
    later.close()


def test_a_lease_whose_process_is_gone_on_this_host_is_taken_over_at_once(tmp_path):
    out = str(tmp_path / "out")
    code = ("import sys; from ray_inspect.io.lease import Lease; "
            f"l = Lease({out!r}, stale_after=3600, settle=0).take(); sys.stdout.write(l.me.owner)")
    owner = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert _holder(out)["owner"] == owner                        # the process exited holding it
    lease = Lease(out, stale_after=3600, settle=0).take()
    assert lease.previous.owner == owner
    lease.close()


def test_a_holder_whose_lease_was_taken_over_knows(tmp_path):
    out = str(tmp_path / "out")
    first = Lease(out, stale_after=5, settle=0).take()
    storage.write_text(storage.join(out, LEASE), json.dumps(
        {"owner": "other", "host": "h", "pid": 1, "started": 0, "heartbeat": time.time()}))
    deadline = time.time() + 5
    while first.lost is None and time.time() < deadline:
        time.sleep(0.1)
    assert first.lost and "another scan took the lease" in first.lost
    first.close()
    assert _holder(out)["owner"] == "other"                      # not ours: left alone
