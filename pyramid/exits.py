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


# The tools (stats, pack): a file of the tree met while working cannot be used (damaged, not a regular file, not
# as manifest.json says); one line names it and nothing is written. The same number as the extractor's
# IMAGES_FAILED: an input is broken, not the machine.
DAMAGED_INPUT = 3


class DamagedFile(ValueError):
    """A file that the tools or the reader cannot use: a pyramid, manifest.json, pack.json, a pack array, the
    lock. `path` names it and `problem` says what is wrong, in one line; str() is 'path: problem'."""

    def __init__(self, path, problem):
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = path, problem
