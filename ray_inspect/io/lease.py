"""The lease a scan holds on its OUT, so that two scans never write one OUT at once.

``OUT/_LEASE`` names its holder (host, process, start) and the time of its last heartbeat; the
holder rewrites it every ``stale_after / 10`` seconds. Another scan on the same OUT stops with
``LeaseHeld`` naming the holder, unless the heartbeat is older than ``stale_after`` (its holder was
killed), or at once when it ran on the same host and its process is gone: then it takes the
lease over and resumes the work. Object stores have no lock, so a
taken lease is read back after a pause: of two scans that take it at the same moment, the one whose
write was overwritten stops; and a holder that finds another name at a heartbeat stops too.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass

from ray_inspect.io import storage

LEASE = "_LEASE"
log = logging.getLogger("ray_inspect")


class LeaseHeld(RuntimeError):
    """OUT is in use by another scan; the message names it."""


@dataclass(frozen=True)
class Holder:
    owner: str              # unique per scan process
    host: str
    pid: int
    started: float
    heartbeat: float

    def describe(self, now: float) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
        return (f"process {self.pid} on {self.host} (started {started}, "
                f"last heartbeat {max(0.0, now - self.heartbeat):.0f} s ago)")


class Lease:
    """A held lease: ``close()`` (or leaving the ``with`` block) gives it back."""

    def __init__(self, out: str, stale_after: float, settle: float = 1.0, clock=time.time):
        self.url = storage.join(out, LEASE)
        self.out, self.stale_after, self.settle, self.clock = out, stale_after, settle, clock
        now = clock()
        self.me = Holder(f"{socket.gethostname()}-{os.getpid()}-{storage.unique_suffix()}",
                         socket.gethostname(), os.getpid(), now, now)
        self.lost: str | None = None          # why the lease was lost while held
        self.previous: Holder | None = None   # a holder that ended without giving the lease back
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def take(self) -> Lease:
        """Take the lease (LeaseHeld when another scan holds it); heartbeats start."""
        holder = self.holder()
        now = self.clock()
        if holder is not None and holder.owner != self.me.owner:
            if now - holder.heartbeat < self.stale_after and not self._gone(holder):
                raise LeaseHeld(f"{self.out}: in use by another scan, {holder.describe(now)}; "
                                f"its lease goes stale {self.stale_after:g} s after its last heartbeat "
                                "(--lease-stale)")
            log.warning("%s: taking over the lease of %s, which ended without giving it back", self.out,
                        holder.describe(now))
            self.previous = holder
        self._write()
        time.sleep(self.settle)
        holder = self.holder()
        if holder is None or holder.owner != self.me.owner:
            raise LeaseHeld(f"{self.out}: another scan took it at the same moment"
                            + (f" ({holder.describe(self.clock())})" if holder else ""))
        self._thread = threading.Thread(target=self._beat, name="ray-inspect-lease", daemon=True)
        self._thread.start()
        return self

    def _gone(self, holder: Holder) -> bool:
        """Whether the holder ran on this host and its process has ended (its lease is stale now)."""
        if holder.host != self.me.host or holder.pid <= 0:
            return False
        try:
            os.kill(holder.pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            return False
        return False

    def holder(self) -> Holder | None:
        """Who holds the lease now (None when nobody does; an unreadable lease is stale)."""
        try:
            data = json.loads(storage.read_text(self.url))
            return Holder(str(data["owner"]), str(data["host"]), int(data["pid"]), float(data["started"]),
                          float(data["heartbeat"]))
        except storage.StorageError as exc:
            if storage.exists(self.url):
                raise exc from None
            return None
        except (ValueError, KeyError, TypeError):
            return Holder("unreadable", "?", 0, 0.0, 0.0)

    def _write(self) -> None:
        me = Holder(**{**asdict(self.me), "heartbeat": self.clock()})
        storage.write_text(self.url, json.dumps(asdict(me)))

    def _beat(self) -> None:
        every = max(0.5, self.stale_after / 10)
        while not self._stop.wait(every):
            try:
                holder = self.holder()
                if holder is not None and holder.owner != self.me.owner:
                    self.lost = f"{self.out}: another scan took the lease ({holder.describe(self.clock())})"
                    log.error("%s", self.lost)
                    return
                self._write()
            except storage.StorageError as exc:          # keep trying: the lease goes stale only later
                log.warning("%s: lease heartbeat failed (%s)", self.out, storage.short_reason(exc))

    def close(self) -> None:
        """Stop the heartbeats and remove the lease, if it is still this scan's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            holder = self.holder()
            if holder is not None and holder.owner == self.me.owner:
                storage.remove(self.url)

    def __enter__(self) -> Lease:
        return self.take()

    def __exit__(self, *exc) -> None:
        self.close()
