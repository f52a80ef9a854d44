"""pyramid/readahead.py: calls run ahead on threads, a failed or stuck one raised within its bound."""

import threading
import time

import pytest

from pyramid.readahead import read_ahead


def test_read_ahead_raises_a_failed_or_stuck_read_within_its_timeout():
    release = threading.Event()

    def read(item):
        if item == "broken.pt":
            raise OSError("Input/output error")
        if item == "stuck.pt":
            release.wait(60)
        return item.upper()

    threads = threading.active_count()
    assert list(read_ahead(read, ["a.pt", "b.pt", "c.pt"], 2, 2)) == ["A.PT", "B.PT", "C.PT"]
    results = read_ahead(read, ["a.pt", "broken.pt", "c.pt"], 2, 2)
    assert next(results) == "A.PT"
    with pytest.raises(OSError, match="Input/output error"):
        next(results)
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="reading stuck.pt has not returned in 0.2 s"):
        list(read_ahead(read, ["a.pt", "stuck.pt", "c.pt"], 2, 2, timeout=0.2))
    assert time.monotonic() - started < 5
    release.set()  # the stuck read returns: its thread ends, as the others did
    deadline = time.monotonic() + 10
    while threading.active_count() > threads and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() == threads
