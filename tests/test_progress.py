"""pyramid/progress.py: plain lines for logs, a bar on terminals."""

import io

from pyramid.progress import Progress, format_duration


def test_format_duration():
    assert format_duration(3725) == "1:02:05"
    assert format_duration(0) == "0:00:00"


def test_plain_lines_without_carriage_returns():
    stream = io.StringIO()
    progress = Progress(200, stream=stream, interactive=False, every_percent=10, every_seconds=3600)
    for done in range(1, 201):
        progress.update(done)
    progress.close()
    text = stream.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 10  # one line every 10 %, the last at 200/200
    assert lines[-1].startswith("progress: 200/200 images (100%)")
    assert all(line.startswith("progress: ") for line in lines)


def test_interactive_uses_a_bar():
    stream = io.StringIO()
    progress = Progress(10, stream=stream, interactive=True)
    progress.update(10)
    progress.close()
    assert "\r" in stream.getvalue() and "10/10" in stream.getvalue()
