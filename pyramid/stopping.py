"""Stopping a run: SIGINT/SIGTERM, a second Ctrl-C, a launcher that dies.

SIGINT/SIGTERM ask for a clean stop after the files in flight, a second Ctrl-C stops at once, and ranks
under a launcher stop when it dies.
"""

import _thread
import contextlib
import ctypes
import os
import signal
import sys
import threading

from pyramid import exits


class StopNow(KeyboardInterrupt):
    """A second Ctrl-C: stop at once, finishing only the files already handed to the writer."""


class StopSignals:
    """SIGINT/SIGTERM ask for a clean stop after the files in flight; a second SIGINT stops at once."""

    def __init__(self):
        self.signum = None
        self.at_once = False
        self._previous = {}
        self._deferring = 0  # depth of deferred() regions the main thread is in
        self._deferred = False  # a second Ctrl-C came inside one: StopNow is raised on leaving it

    def __enter__(self):
        for signum in exits.BY_SIGNAL:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        if self.signum is not None:
            # Stopping already: a Ctrl-C during the last clean-up (workers, atexit hooks) ends the
            # process at once instead of printing a KeyboardInterrupt traceback from wherever it lands.
            signal.signal(signal.SIGINT, lambda *_: os._exit(exits.BY_SIGNAL[signal.SIGINT]))

    def _handle(self, signum, frame):
        if self.at_once:  # already stopping at once: more Ctrl-C would only interrupt the last writes
            return
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            if _in_finaliser(frame):
                # Raised in a __del__ or a weakref callback it would only print "Exception ignored":
                # the same signal again in a moment, once that code has returned.
                threading.Timer(0.05, _thread.interrupt_main, args=(signal.SIGINT,)).start()
                return
            self.at_once = True
            if self._deferring:
                self._deferred = True
                return
            raise StopNow
        self.signum = signum

    @contextlib.contextmanager
    def deferred(self):
        """A region a second Ctrl-C does not interrupt: its StopNow is raised on leaving the region instead
        (`at_once` is set at once). For hand-overs to threads through queue.Queue: an exception raised
        inside Condition.notify, between waking a waiter and taking it off the list, leaves that waiter
        behind, and the next notify goes to it, so a thread waiting on the queue is never woken (a writer
        thread that never takes its end-of-work marker, and a close() that waits for it forever)."""
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1
        if self._deferred and not self._deferring:
            self._deferred = False
            raise StopNow


# Code run by the garbage collector, where an exception is printed and dropped instead of raised.
FINALISER_FILES = ("weakref.py", "_weakrefset.py")


def _in_finaliser(frame):
    """True when `frame` runs inside a __del__ (a DataLoader shutting its workers down, say) or a
    weakref callback."""
    while frame is not None:
        if frame.f_code.co_name == "__del__" or os.path.basename(frame.f_code.co_filename) in FINALISER_FILES:
            return True
        frame = frame.f_back
    return False


def stop_with_launcher():
    """Under a launcher (torchrun / accelerate launch), ask the kernel for SIGTERM when it dies.

    torchrun starts each rank in a session of its own, so a launcher killed with SIGKILL would leave
    its ranks running as orphans that clash with the next launch; with this they stop cleanly after
    the batch in flight instead. Linux only; elsewhere a no-op.
    """
    if "LOCAL_RANK" not in os.environ or not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != parent:  # the launcher died before the request was in place
        os.kill(os.getpid(), signal.SIGTERM)
