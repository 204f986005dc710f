"""{date} placeholders of nightly runs: expansion, the default night, and what is refused."""

import datetime as dt

import pytest

from ray_inspect.partitions import expand, night, resolve


def test_placeholders_expand_with_isoformat_or_a_strftime_format():
    day = dt.date(2026, 3, 9)
    assert expand("s3://b/in/{date}/", day) == "s3://b/in/2026-03-09/"
    assert expand("s3://b/in/{date:year=%Y/month=%m/day=%d}", day) == "s3://b/in/year=2026/month=03/day=09"
    assert expand("/out/{date:%Y%m%d}/{date}", day) == "/out/20260309/2026-03-09"
    assert expand("/plain/path", day) == "/plain/path"


@pytest.mark.parametrize("template", ["s3://b/{data}", "s3://b/{date", "s3://b/date}", "/x/{date:%Y.%m}",
                                      "/x/{date:%Y,%m}", "/x/{}"])
def test_other_braces_are_refused_in_one_line(template):
    with pytest.raises(ValueError, match=r"the only placeholders are \{date\}") as exc:
        expand(template, dt.date(2026, 1, 1))
    assert "\n" not in str(exc.value)


def test_the_default_night_is_yesterday_in_the_configured_time_zone():
    # 23:30 UTC on 1 March is already 2 March in Berlin (UTC+1) and still 1 March in New York.
    now = dt.datetime(2026, 3, 1, 23, 30, tzinfo=dt.UTC)
    assert night(None, "UTC", now) == dt.date(2026, 2, 28)
    assert night(None, "Europe/Berlin", now) == dt.date(2026, 3, 1)
    assert night(None, "America/New_York", now) == dt.date(2026, 2, 28)
    assert night("2025-12-31", "Europe/Berlin", now) == dt.date(2025, 12, 31)


def test_bad_dates_and_zones_and_a_date_with_nothing_to_fill_are_refused():
    with pytest.raises(ValueError, match="--date must be YYYY-MM-DD, not '31.12.2025'"):
        night("31.12.2025")
    with pytest.raises(ValueError, match="unknown time zone 'Mars/Olympus'"):
        night(None, "Mars/Olympus")
    with pytest.raises(ValueError, match="neither SOURCE nor OUT has a"):
        resolve("s3://b/in", "s3://b/out", "2026-01-02", "UTC")
    assert resolve("s3://b/in", "s3://b/out", None, "UTC") == ("s3://b/in", "s3://b/out", None)
    src, out, day = resolve("s3://b/in/{date}", "s3://b/out/{date:%Y/%m/%d}", "2026-01-02", "UTC")
    assert (src, out, day) == ("s3://b/in/2026-01-02", "s3://b/out/2026/01/02", dt.date(2026, 1, 2))
