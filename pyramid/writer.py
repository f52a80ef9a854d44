"""Atomic .pt writes on a background thread, and the failures.jsonl record."""

import io
import json
import os
import queue
import threading
from pathlib import Path

from pyramid.paths import temporary_name, writer_tag
from pyramid.pool import split_pyramids

FAILURES_NAME = "failures.jsonl"
def save_atomic(obj, path, fsync=False):
    """torch.save `obj` to `path` through a hidden temporary in the same directory and a rename.

    A path that exists is therefore complete while the machine stays up; on any error the temporary is
    removed. With `fsync` the file's data reaches the disk before the rename and the rename before
    returning, so the file also survives a node crash or power loss (see docs/scale.md for the cost).
    """
    import torch  # here, not at the top: verify reads FAILURES_NAME from this module and starts without torch

    path = Path(path)
    temporary = temporary_name(path, writer_tag())
    buffer = io.BytesIO()
    # Serialised in memory, then written by plain file I/O: a full disk (or any failing write) then
    # raises OSError "No space left on device", where torch.save to a path reports only
    # "[enforce fail at inline_container.cc] unexpected pos".
    torch.save(obj, buffer)
    try:
        with open(temporary, "wb") as file:
            file.write(buffer.getbuffer())
            if fsync:
                os.fsync(file.fileno())
        os.replace(temporary, path)
        if fsync:
            _fsync_directory(path.parent)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _fsync_directory(directory):
    """Make a rename in `directory` durable: its entry is data of the directory, not of the file."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def record_failure(output_dir, relative_path, message):
    """Append one {"path", "error"} line to failures.jsonl: one write call with O_APPEND, so lines
    from several processes never interleave."""
    line = json.dumps({"path": relative_path, "error": message}, ensure_ascii=False) + "\n"
    fd = os.open(Path(output_dir) / FAILURES_NAME, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line.encode("utf-8"))
    finally:
        os.close(fd)


class Writer:
    """Splits batches into per-image pyramids and saves them on a background thread, so neither the
    clones nor torch.save ever stall the forward pass.

    `submit_batch` blocks only when `max_pending` batches wait. The first write error stops the
    writer; `check` raises it in the caller's thread. `close` waits for every submitted file.
    """

    def __init__(self, output_dir, max_pending=4, fsync=False):
        self.output_dir = Path(output_dir)
        self.fsync = fsync
        self.queue = queue.Queue(maxsize=max_pending)
        self.error = None
        self.written = 0
        self._made_dirs = set()
        self._thread = threading.Thread(target=self._loop, name="pyramid-writer", daemon=True)
        self._thread.start()

    def submit_batch(self, relative_outputs, levels):
        """Queue one batch: output paths (B,) and {"16x16": (B, 256, D), ...} CPU fp32 tensors."""
        self.check()
        self.queue.put((relative_outputs, levels))

    def check(self):
        if self.error is not None:
            raise self.error

    def close(self):
        self.queue.put(None)
        self._thread.join()
        self.check()

    def _loop(self):
        while (item := self.queue.get()) is not None:
            if self.error is None:  # after an error, drain so submit_batch never blocks forever
                self._write_batch(*item)

    def _write_batch(self, relative_outputs, levels):
        for relative_output, pyramid in zip(relative_outputs, split_pyramids(levels)):
            path = self.output_dir / relative_output
            try:
                if path.parent not in self._made_dirs:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    self._made_dirs.add(path.parent)
                save_atomic(pyramid, path, fsync=self.fsync)
            except Exception as error:
                self.error = OSError(f"cannot write {path}: {error}")
                return
            self.written += 1
