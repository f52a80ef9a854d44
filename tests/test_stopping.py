"""pyramid/stopping.py: a second Ctrl-C inside a deferred region is raised on leaving it, never inside."""

import os
import signal
import time

import pytest

from pyramid.stopping import StopNow, StopSignals


@pytest.fixture
def restored_handlers():
    """StopSignals leaves an exit-at-once SIGINT handler behind once stopping: the test process gets its own back."""
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def ctrl_c():
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.05)  # the handler runs in this (main) thread between two bytecodes, well within this


def test_a_second_ctrl_c_inside_a_deferred_region_is_raised_on_leaving_it(restored_handlers):
    reached = []
    with StopSignals() as signals:
        ctrl_c()  # the first: a clean stop is asked, nothing raised
        assert signals.signum == signal.SIGINT and not signals.at_once
        with pytest.raises(StopNow):
            with signals.deferred():
                ctrl_c()  # the second, inside the region: held
                reached.append("the region's end")
                assert signals.at_once  # stopping at once is known at once (no waiting for peers)
        assert reached == ["the region's end"]
        ctrl_c()  # once stopping at once, more Ctrl-C are ignored
    assert signals.at_once


def test_a_second_ctrl_c_outside_a_region_is_raised_where_it_lands(restored_handlers):
    reached = []
    with StopSignals() as signals:
        ctrl_c()
        with pytest.raises(StopNow):
            ctrl_c()
            reached.append("after the second Ctrl-C")
        assert reached == []
        with signals.deferred():  # a region after it raises nothing: StopNow was already raised
            pass


def test_nested_regions_raise_once_on_leaving_the_outermost(restored_handlers):
    with StopSignals() as signals:
        ctrl_c()
        with pytest.raises(StopNow):
            with signals.deferred():
                with signals.deferred():
                    ctrl_c()
                left_inner = True
        assert left_inner
