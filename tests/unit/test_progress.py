"""Progress lines: the rate and ETA of this run, how often each kind of output reports."""

import io

from ray_inspect.telemetry.progress import ProgressLine, eta_text


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_log_lines_every_interval_with_this_runs_rate_and_eta():
    clock, out, said = Clock(), io.StringIO(), []
    line = ProgressLine("scan", "images", lambda *a, **k: said.append((a, k)), every=30, stream=out,
                        clock=clock)
    clock.t = 10.0
    line.update(60, 200, fresh=50, failed=1)            # 10 resumed images do not count toward the rate
    clock.t = 20.0
    line.update(110, 200, fresh=100, failed=1)          # within 30 s of the last line: not printed
    clock.t = 45.0
    line.update(200, 200, fresh=190, failed=2)
    line.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "scan 60/200 images (30%)  5.0 images/s  failed 1  ETA 00:28"
    assert lines[1] == "scan 200/200 images (100%)  4.0 images/s  failed 2  ETA 00:00"   # since the first
    assert len(lines) == 3 and lines[2] == lines[1]     # close() reports the last state
    assert said == []


def test_json_records_carry_the_figures_as_fields():
    clock, said = Clock(), []
    line = ProgressLine("epoch 2/8", "patches", lambda msg, **k: said.append((msg, k)), json_logs=True,
                        every=30, stream=Tty(), clock=clock)
    line.update(1000, 2500, elapsed=20.0, **{"loss": "0.61", "tiles/s": 12})
    assert said == [("epoch 2/8 1000/2500 patches (40%)  50.0 patches/s  loss 0.61  tiles/s 12  ETA 00:30",
                     {"progress": "epoch 2/8", "done": 1000, "total": 2500, "per_s": 50.0, "loss": "0.61",
                      "tiles_per_s": 12})]


def test_a_terminal_line_is_redrawn_cleared_for_messages_and_ended():
    clock, out = Clock(), Tty()
    line = ProgressLine("scan", "images", print, every=30, stream=out, clock=clock)
    clock.t = 1.0
    line.update(1, 4)
    clock.t = 2.0
    line.update(2, 4)
    line.interrupt()
    line.close()
    text = out.getvalue()
    assert text.startswith("\rscan 1/4 images (25%)  1.0 images/s  ETA 00:03\rscan 2/4 images")
    assert "\r" + " " * len("scan 2/4 images (50%)  1.0 images/s  ETA 00:02") + "\r" in text
    assert text.endswith("\n") and eta_text(3725) == "1:02:05" and eta_text(None) == "--:--"
