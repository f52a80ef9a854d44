"""pyramid/progress.py: plain lines for logs, a bar on terminals."""

import io
import os
import sys

from pyramid.progress import Progress, format_duration, log, print_summary
from pyramid.tree import FAILURES_NAME


def test_format_duration():
    assert format_duration(3725) == "1:02:05"
    assert format_duration(0) == "0:00:00"


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_plain_lines_without_carriage_returns_once_the_run_lasts():
    stream, clock = io.StringIO(), FakeClock()
    progress = Progress(200, stream=stream, interactive=False, every_percent=10, every_seconds=3600, clock=clock)
    clock.now += 30  # past the quiet start
    for done in range(1, 201):
        progress.update(done)
    progress.close()
    text = stream.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 10  # one line every 10 %, the last at 200/200
    assert lines[-1].startswith("progress: 200/200 images (100%)")
    assert all(line.startswith("progress: ") for line in lines)


def test_a_short_run_prints_no_lines_a_long_one_every_step_or_interval():
    stream, clock = io.StringIO(), FakeClock()
    short = Progress(200, stream=stream, interactive=False, clock=clock)
    for done in range(1, 201):
        clock.now += 0.005  # a one-second check
        short.update(done)
    assert stream.getvalue() == ""

    long = Progress(1000, stream=stream, interactive=False, every_percent=5, every_seconds=30, clock=clock)
    for done in range(1, 11):
        clock.now += 10  # 100 s for 1 %: the 30 s interval, not the 5 % step, sets the pace
        long.update(done)
    lines = stream.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["3/1000", "6/1000", "9/1000"]


def test_interactive_uses_a_bar():
    stream = io.StringIO()
    progress = Progress(10, stream=stream, interactive=True)
    progress.update(10)
    progress.close()
    assert "\r" in stream.getvalue() and "10/10" in stream.getvalue()


def test_format_bytes():
    from pyramid.progress import format_bytes

    assert format_bytes(73_400_000_000) == "73.4 GB"
    assert format_bytes(2_500_000) == "2.5 MB"
    assert format_bytes(49_152) == "49.2 KB"
    assert format_bytes(0) == "0.0 KB"


def test_a_name_that_is_not_utf8_is_logged_as_failures_jsonl_has_it_even_on_a_strict_stream(monkeypatch):
    raw = io.BytesIO()
    monkeypatch.setattr(sys, "stderr", io.TextIOWrapper(raw, encoding="utf-8", errors="strict"))
    log("failed: " + os.fsdecode(b"bad\xfe.png") + ": broken")
    sys.stderr.flush()
    assert raw.getvalue() == b"failed: bad\\xfe.png: broken\n"


def test_the_summary_of_a_run_with_nothing_to_encode_gives_no_rate(tmp_path, capsys):
    print_summary(0, 64, 0, 3.2, 0.0, tmp_path / FAILURES_NAME, 0, [0])
    assert capsys.readouterr().err == ("done: 0 written, 64 skipped (already there), 0 failed in 0:00:03 "
                                       "(3.2 s; nothing encoded)\n")
    print_summary(10, 0, 0, 4.0, 2.0, tmp_path / FAILURES_NAME, 0, [6, 4])
    assert capsys.readouterr().err == ("done: 10 written, 0 skipped (already there), 0 failed in 0:00:04 (4.0 s; "
                                       "5.00 images/s while encoding); per process: 6, 4\n")
    print_summary(10, 0, 0, 4.0, 2.0, tmp_path / FAILURES_NAME, 8, [6, 4])  # never "done" with images left
    assert capsys.readouterr().err == ("not finished: 10 written, 0 skipped (already there), 0 failed, 8 not done "
                                       "in 0:00:04 (4.0 s; 5.00 images/s while encoding); per process: 6, 4\n")
