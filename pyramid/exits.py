"""Exit statuses of the tools, and the error that means "fix the arguments" (status 2)."""

import signal

OK = 0
WRITE_ERROR = 1
USAGE = 2
IMAGES_FAILED = 3
# The run ended with images of its to-do list neither written nor recorded failures: a process raised an
# error, got stuck (--stall_timeout) or was killed. A rerun finishes them.
INCOMPLETE = 4
BY_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}


class UsageError(Exception):
    """A problem with the arguments or the directories; the message says what to do, in one line."""
