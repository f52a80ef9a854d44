"""Calls run ahead on daemon threads, each waited for with a bound: the reads of many files overlapped."""

import queue
import threading
import time
import weakref
from collections import deque

# How long a waiter waits for one read before it gives up: a hung file system (an NFS server gone), not
# a slow one, since one read is one file or one batch.
READ_TIMEOUT = 600.0
# How often an idle read thread checks that its owner still exists.
IDLE_CHECK_SECONDS = 1.0


class Call:
    """One call handed to ReadThreads: its result, or the error it raised, once `done` is set."""

    __slots__ = ("function", "args", "done", "result", "error")

    def __init__(self, function, args):
        self.function, self.args = function, args
        self.done = threading.Event()
        self.result = self.error = None

    def run(self):
        try:
            self.result = self.function(*self.args)
        except BaseException as error:  # noqa: BLE001 - raised by whoever waits for the call
            self.error = error
        finally:
            self.function = self.args = None  # the buffers it read into are the caller's again
            self.done.set()

    def outcome(self):
        """The result of a done call, or its error raised here."""
        if self.error is not None:
            raise self.error
        return self.result


class ReadThreads:
    """`count` daemon threads that run the calls handed to them. Daemon threads, not a ThreadPoolExecutor's:
    a read stuck for ever (a hung file system) then holds one thread, never the process's exit, and
    whoever waits for a call waits with a bound. The threads end on close(), or by themselves once
    this object is garbage collected (a loader dropped in the middle of an epoch)."""

    def __init__(self, count, name="pyramid-read"):
        self._calls = queue.SimpleQueue()
        owner = weakref.ref(self)
        self.threads = [threading.Thread(target=_serve, args=(self._calls, owner), name=f"{name}-{index}", daemon=True)
                        for index in range(count)]
        for thread in self.threads:
            thread.start()

    def submit(self, function, *args):
        call = Call(function, args)
        self._calls.put(call)
        return call

    def close(self, wait=0.0):
        """End the threads once their calls are done; wait at most `wait` seconds for them to end."""
        for _ in self.threads:
            self._calls.put(None)
        deadline = time.monotonic() + wait
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))


def _serve(calls, owner):
    while True:
        try:
            call = calls.get(timeout=IDLE_CHECK_SECONDS)
        except queue.Empty:
            if owner() is None:
                return
            continue
        if call is None:
            return
        call.run()


def read_ahead(function, items, workers, window, timeout=READ_TIMEOUT, describe=str):
    """function(item) for every item, in order, on `workers` threads, at most `window` results ahead: the
    reads of many files (reader.read_pyramid releases the GIL in its preadv) overlapped. An item whose call
    raises raises here; one not done within `timeout` seconds of being waited for raises TimeoutError
    naming it (`describe(item)`). Leaving early (an error, a break) leaves the calls still running to
    finish on their own."""
    threads = ReadThreads(workers)
    try:
        pending = deque()
        for item in items:
            pending.append((item, threads.submit(function, item)))
            if len(pending) >= window:
                yield _outcome(*pending.popleft(), timeout, describe)
        while pending:
            yield _outcome(*pending.popleft(), timeout, describe)
    finally:
        threads.close()


def _outcome(item, call, timeout, describe):
    if not call.done.wait(timeout):
        raise TimeoutError(f"reading {describe(item)} has not returned in {timeout:g} s; is its file system hung?")
    return call.outcome()
