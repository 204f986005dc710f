"""Progress of a long step for people and for log collectors.

On a terminal one line is redrawn in place (count, rate, ETA and the step's own figures); where
stderr is not a terminal (``kubectl logs``, a file) a line is printed every ``every`` seconds; with
JSON logs a progress record goes out every ``every`` seconds. The last state is always reported.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

Say = Callable[..., None]   # say(message, **fields): Telemetry.say


def eta_text(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60:02d}:{rem % 60:02d}"


class ProgressLine:
    """``update(done, total, **figures)`` as work advances; ``close()`` once it ends.

    ``figures`` are shown as given (``name value``) and, with JSON logs, sent as fields. ``fresh``
    is the part of ``done`` this run did (a resumed scan skips the rest), so the rate is this run's;
    ``elapsed`` overrides the seconds since the line was created (when the work began earlier).
    """

    def __init__(self, label: str, unit: str, say: Say, json_logs: bool = False, every: float = 30.0,  # noqa: PLR0913 - how and where it reports
                 stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic):
        self.label, self.unit, self.say, self.json_logs, self.every = label, unit, say, json_logs, every
        self.stream = stream or sys.stderr
        self.clock = clock
        self.tty = not json_logs and self.stream.isatty()
        self.t0 = clock()
        self.fresh = 0
        self.first: tuple[float, int] | None = None   # (elapsed, fresh) at the first update
        self.seconds: float | None = None
        self.last_out = -1e18
        self.state: tuple[int, int, dict[str, Any]] | None = None
        self.width = 0

    def elapsed(self) -> float:
        return self.seconds if self.seconds is not None else self.clock() - self.t0

    def rate(self) -> float:
        """Work per second since the first update (start-up excluded), or since the start before that."""
        elapsed = self.elapsed()
        if self.first is not None and self.fresh > self.first[1] and elapsed > self.first[0]:
            return (self.fresh - self.first[1]) / (elapsed - self.first[0])
        return self.fresh / elapsed if elapsed > 0 else 0.0

    def line(self, done: int, total: int, figures: dict[str, Any]) -> str:
        """``total`` None: not known yet (the work is still being listed)."""
        rate = self.rate()
        extra = "".join(f"  {k} {v}" for k, v in figures.items())
        if total is None:
            return f"{self.label} {done} {self.unit} (listing)  {rate:.1f} {self.unit}/s{extra}"
        eta = (total - done) / rate if rate > 0 else None
        pct = 100.0 * done / total if total else 100.0
        return (f"{self.label} {done}/{total} {self.unit} ({pct:.0f}%)  {rate:.1f} {self.unit}/s{extra}  "
                f"ETA {eta_text(eta)}")

    def update(self, done: int, total: int | None, fresh: int | None = None, elapsed: float | None = None,  # noqa: PLR0913 - counts, then the step's own figures
               **figures: Any) -> None:
        self.fresh = done if fresh is None else fresh
        self.seconds = elapsed
        if self.first is None:
            self.first = (self.elapsed(), self.fresh)
        self.state = (done, total, figures)
        now = self.clock()
        if now - self.last_out < (0.2 if self.tty else self.every):
            return
        self.last_out = now
        self._emit(done, total, figures)

    def _emit(self, done: int, total: int | None, figures: dict[str, Any]) -> None:
        text = self.line(done, total, figures)
        if self.tty:
            self.stream.write("\r" + text.ljust(self.width))
            self.stream.flush()
            self.width = len(text)
        elif self.json_logs:
            fields = {k.replace("/s", "_per_s").replace(" ", "_"): v for k, v in figures.items()}
            self.say(text, progress=self.label, done=done, total=total,
                     per_s=round(self.rate(), 3), **fields)
        else:
            print(text, file=self.stream, flush=True)

    def interrupt(self) -> None:
        """Clear the redrawn line, so that another message takes its place; the next update redraws it."""
        if self.tty and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
            self.width = 0
            self.last_out = -1e18

    def close(self) -> None:
        """Report the last state (once), and end the line."""
        if self.state is not None:
            self._emit(*self.state)
        if self.tty and self.width:
            self.stream.write("\n")
            self.stream.flush()
        self.state, self.width = None, 0
