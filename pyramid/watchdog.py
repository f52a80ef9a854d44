"""Bounds on a process that stops making progress: --stall_timeout, and a bounded stop after SIGINT/SIGTERM.

A stuck CUDA kernel or filesystem call can hold the main thread in C, with the GIL held or its signals
masked, where neither a Python signal handler nor the loop's own checks ever run. Two layers watch it:

- a Python thread, which hears SIGINT/SIGTERM through `signal.set_wakeup_fd` (written by the C-level
  handler on whatever thread the signal lands) and keeps the stall clock. When the main thread has not
  finished a batch for `stall_timeout` seconds, has not run its signal handler within
  SIGNAL_REACT_SECONDS of a signal, or has not ended within SIGNAL_STOP_SECONDS of it, the thread says so
  in one line, writes every thread's stack to the log (faulthandler), lets the run record what it can,
  and ends the process;
- behind it faulthandler's own thread, in C, which needs no GIL: armed BACKSTOP_SECONDS past the Python
  thread's deadline, it writes the stacks and exits with status 1 where that thread could not run.
"""

import faulthandler
import os
import select
import signal
import socket
import sys
import threading
import time

from pyramid import exits
from pyramid.progress import log

# torchrun SIGKILLs a rank 30 s after its SIGTERM: a main thread that has not run its signal handler
# within this long is stuck, and one that reacted must have ended by SIGNAL_STOP_SECONDS.
SIGNAL_REACT_SECONDS = 10.0
SIGNAL_STOP_SECONDS = 25.0
# faulthandler's C thread acts this long after the Python thread should have (it may be blocked itself,
# recording on a hung filesystem, say).
BACKSTOP_SECONDS = 30.0
# The C deadline is moved at most this often: each move starts a new C thread.
REARM_SECONDS = 1.0
POLL_SECONDS = 0.5
WATCHED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _stack_stream():
    """A file with a descriptor for faulthandler: stderr, or the process's own fd 2 where stderr is replaced."""
    for stream in (sys.stderr, sys.__stderr__):
        try:
            stream.fileno()
            return stream
        except (AttributeError, OSError, ValueError):
            continue
    return None


class Watchdog:
    """The watchdog of one run's process, entered on the main thread (set_wakeup_fd must be).

    `give_up(message, status)` is called once, on the watchdog's thread, after the message is said and the
    stacks are written: it records what it can (counts, the runs.jsonl line) and must not wait without a
    bound (the C backstop is armed meanwhile). Then the process ends with `status`. `reacted()` is True
    once the main thread has run its signal handler. `where` names the process in the message
    ("process 1 on node3: ", or "" for a run of one).

    The stall clock runs between `arm()` and `pause()`; `beat()` says a batch finished (and arms the clock
    when it is not running: with --compile the first batch, which compiles, is not counted).
    """

    def __init__(self, stall_timeout, give_up, reacted=lambda: True, where=""):
        self.stall_timeout = stall_timeout
        self.where = where
        self._give_up = give_up
        self._reacted = reacted
        self._last_batch = None  # monotonic time of the last batch (or of arming) while the clock runs
        self._rearmed = 0.0
        self._signal = None  # (signum, monotonic time) of the first SIGINT/SIGTERM
        self._stream = _stack_stream()
        self._done = threading.Event()
        self._ending = threading.Lock()
        self._reader = self._writer = self._thread = None
        self._previous_fd = -1

    def __enter__(self):
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)
        self._previous_fd = signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
        self._thread = threading.Thread(target=self._watch, name="pyramid-watchdog", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.pause()
        signal.set_wakeup_fd(self._previous_fd)
        self._done.set()
        self._thread.join()  # it wakes every POLL_SECONDS
        self._reader.close()
        self._writer.close()

    def arm(self):
        """Start the stall clock now (the model is loaded)."""
        self._last_batch = time.monotonic()
        self._rearm(force=True)

    def beat(self):
        """A batch finished: the stall clock starts again (and starts, if it was not running)."""
        if self._last_batch is None:
            self.arm()
            return
        self._last_batch = time.monotonic()
        self._rearm()

    def pause(self):
        """Stop the stall clock: what follows has bounds of its own (waiting for peers)."""
        self._last_batch = None
        if self._stream is not None:
            faulthandler.cancel_dump_traceback_later()

    def _rearm(self, force=False):
        now = time.monotonic()
        if self._stream is not None and (force or now - self._rearmed >= REARM_SECONDS):
            self._rearmed = now
            faulthandler.dump_traceback_later(self.stall_timeout + BACKSTOP_SECONDS, exit=True, file=self._stream)

    def _watch(self):
        while not self._done.is_set():
            try:
                readable, _, _ = select.select([self._reader], [], [], POLL_SECONDS)
                received = self._reader.recv(64) if readable else b""
            except (BlockingIOError, InterruptedError):
                received = b""
            except OSError:  # closed by __exit__
                return
            now = time.monotonic()
            for signum in received:
                if signum in WATCHED_SIGNALS and self._signal is None:
                    self._signal = (signal.Signals(signum), now)
            if self._signal is not None:
                signum, at = self._signal
                if now - at >= SIGNAL_REACT_SECONDS and not self._reacted():
                    self._end(f"{signum.name} came {now - at:.0f} s ago and the main thread has not "
                              f"responded; stopping at once", exits.BY_SIGNAL[signum])
                elif now - at >= SIGNAL_STOP_SECONDS:
                    self._end(f"{signum.name} came {now - at:.0f} s ago and the run has not ended; "
                              f"stopping at once", exits.BY_SIGNAL[signum])
            last_batch = self._last_batch
            if last_batch is not None and now - last_batch >= self.stall_timeout:
                self._end(f"no batch finished in {now - last_batch:.0f} s (--stall_timeout "
                          f"{self.stall_timeout:g}); stuck", exits.INCOMPLETE)

    def _end(self, message, status):
        """Say `message`, write every thread's stack, let the run record, end the process with `status`."""
        if not self._ending.acquire(blocking=False):
            return
        if self._stream is not None:  # the backstop, should recording hang
            faulthandler.dump_traceback_later(BACKSTOP_SECONDS, exit=True, file=self._stream)
        log(f"error: {self.where}{message}; every thread's stack follows")
        if self._stream is not None:
            faulthandler.dump_traceback(file=self._stream, all_threads=True)
            self._stream.flush()
        try:
            self._give_up(f"{self.where}{message}", status)
        except Exception as error:
            log(f"warning: could not record this end ({type(error).__name__}: {error})")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
