"""Date-partitioned paths for nightly runs: ``{date}`` in a SOURCE or OUT becomes the night's date.

``{date}`` is the ISO date (``2026-12-01``); ``{date:FORMAT}`` takes a strftime format made of
letters, digits, ``%``, ``/``, ``_``, ``=`` and ``-`` (``{date:year=%Y/month=%m/day=%d}``). The date
is ``--date`` when given, else yesterday in the run's time zone: a job that starts at 02:00 scans the
day that just ended.
"""

from __future__ import annotations

import datetime as dt
import re
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

PLACEHOLDER = re.compile(r"\{date(?::([%A-Za-z0-9/_=-]+))?\}")
_BRACES = re.compile(r"[{}]")


def zone(name: str) -> ZoneInfo:
    """An IANA time zone; an unknown name is one ValueError."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r} (an IANA name such as Europe/Berlin or UTC)") from None


def night(date: str | None, tz: str = "UTC", now: dt.datetime | None = None) -> dt.date:
    """The date to scan: ``date`` (YYYY-MM-DD), else yesterday in ``tz`` (``now`` for tests)."""
    if date is not None:
        try:
            return dt.date.fromisoformat(date)
        except ValueError:
            raise ValueError(f"--date must be YYYY-MM-DD, not {date!r}") from None
    today = (now or dt.datetime.now(dt.UTC)).astimezone(zone(tz)).date()
    return today - dt.timedelta(days=1)


def has_placeholder(template: str) -> bool:
    return PLACEHOLDER.search(template) is not None


def expand(template: str, day: dt.date) -> str:
    """``template`` with each ``{date}`` / ``{date:FORMAT}`` replaced; any other brace is an error
    (a typo such as ``{data}`` must not scan a literal folder of that name)."""
    if _BRACES.search(PLACEHOLDER.sub("", template)):
        raise ValueError(f"{template}: the only placeholders are {{date}} and {{date:FORMAT}} "
                         "(FORMAT: strftime codes, letters, digits, / _ = -)")
    return PLACEHOLDER.sub(lambda m: day.strftime(m.group(1) or "%Y-%m-%d"), template)


def resolve(source: str, out: str, date: str | None, tz: str) -> tuple[str, str, dt.date | None]:
    """SOURCE and OUT of one night: (source, out, the date, or None when neither has a placeholder).
    ``--date`` without a placeholder to fill is a mistake, not something to ignore."""
    if not (has_placeholder(source) or has_placeholder(out)):
        if date is not None:
            raise ValueError("--date was given, but neither SOURCE nor OUT has a {date} placeholder")
        return expand(source, dt.date.min), expand(out, dt.date.min), None
    day = night(date, tz)
    return expand(source, day), expand(out, day), day
