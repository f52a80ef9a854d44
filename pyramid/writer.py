"""Atomic .pt writes on background threads, and the failures.jsonl record."""

import io
import json
import os
import queue
import threading
from pathlib import Path

from pyramid.paths import temporary_name, writer_tag
from pyramid.team import cpus_per_process
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


def default_writer_threads():
    """Writer threads per process: up to 4, and no more than the CPUs this process may use.

    A base-size pyramid is a 1 MB file, about 1 ms of a core: the copy out of the batch and the write
    into the page cache release the GIL, torch.save (its CRC32 most of all) holds it for about a
    third. Threads therefore add up until the GIL or the disk is the limit, which four reach (the
    write bound of pyramid.bench measures it; docs/gpu.md has the figures); a GPU fed 256x256 PNGs
    needs more than one. Idle threads sleep, so a CPU-only run loses nothing.
    """
    return min(4, cpus_per_process())


class Writer:
    """Splits batches into per-image pyramids and saves them on `threads` background threads, so
    neither the clones nor torch.save ever stall the forward pass.

    Each thread takes a whole batch, copies its images out (after waiting for the batch's `ready`
    event when the values are still arriving from the GPU), hands the batch's memory back through
    its `release`, then saves the files. `submit_batch` blocks only when `max_pending` batches wait,
    so the memory held stays a few batches whatever the run's size. The first write error stops the
    writer; `check` raises it in the caller's thread. `close` waits for every submitted file.
    """

    def __init__(self, output_dir, max_pending=4, threads=1, fsync=False):
        self.output_dir = Path(output_dir)
        self.fsync = fsync
        self.queue = queue.Queue(maxsize=max_pending)
        self.error = None
        self._error_lock = threading.Lock()
        self._written = [0] * threads  # one counter per thread: no lock on the hot path
        self._non_finite = [0] * threads
        self._made_dirs = set()
        self._threads = [threading.Thread(target=self._loop, args=(slot,), name=f"pyramid-writer-{slot}",
                                          daemon=True) for slot in range(threads)]
        for thread in self._threads:
            thread.start()

    @property
    def written(self):
        return sum(self._written)

    @property
    def non_finite(self):
        """Images given no file because their `finite` flags said so."""
        return sum(self._non_finite)

    def submit_batch(self, relative_outputs, levels, ready=None, release=None, finite=None, on_non_finite=None):
        """Queue one batch: output paths (B,) and {"16x16": (B, 256, D), ...} CPU fp32 tensors.

        `ready` (a CUDA event, or None) completes once `levels` hold their values: the writer waits
        for it, never the caller. `release()` is called once the batch has been copied out of
        `levels` (also after an error), so the caller may reuse that memory. `finite`, (B, k) bool
        arriving with the levels, flags each image's parts (the image, its mirror); an image with a
        False flag gets no file, and `on_non_finite(position in the batch, its flags as a list)` is
        called instead, on a writer thread.
        """
        self.check()
        self.queue.put((relative_outputs, levels, ready, release, finite, on_non_finite))

    def check(self):
        if self.error is not None:
            raise self.error

    def close(self):
        for _ in self._threads:
            self.queue.put(None)
        for thread in self._threads:
            thread.join()
        self.check()

    def _fail(self, error):
        with self._error_lock:
            if self.error is None:
                self.error = error

    def _loop(self, slot):
        while (item := self.queue.get()) is not None:
            relative_outputs, levels, ready, release, finite, on_non_finite = item
            pyramids, flags = [], None
            try:
                if self.error is None:  # after an error, drain so submit_batch never blocks forever
                    if ready is not None:
                        ready.synchronize()
                    if finite is not None:  # read before the release: its buffer is then reused
                        flags = finite.reshape(len(relative_outputs), -1).tolist()  # [[image, mirror], ...]
                    pyramids = split_pyramids(levels)
            except Exception as error:  # a failed device copy: raised in the run loop by check()
                self._fail(error)
            finally:
                del item, levels, finite  # the batch's memory goes back now, not when the next batch arrives
                if release is not None:
                    release()
            if flags is not None and pyramids:
                relative_outputs, pyramids = self._drop_non_finite(slot, relative_outputs, pyramids, flags,
                                                                   on_non_finite)
            self._write_files(slot, relative_outputs, pyramids)

    def _drop_non_finite(self, slot, relative_outputs, pyramids, flags, on_non_finite):
        """The batch's outputs and pyramids without the images flagged non-finite, each reported."""
        kept = []
        for position, (relative_output, pyramid, image_flags) in enumerate(zip(relative_outputs, pyramids, flags)):
            if all(image_flags):
                kept.append((relative_output, pyramid))
                continue
            try:
                on_non_finite(position, image_flags)
            except OSError as error:  # failures.jsonl cannot be written: the run's write error
                self._fail(error)
                return [], []
            self._non_finite[slot] += 1
        return [output for output, _ in kept], [pyramid for _, pyramid in kept]

    def _write_files(self, slot, relative_outputs, pyramids):
        for relative_output, pyramid in zip(relative_outputs, pyramids):
            if self.error is not None:
                return
            path = self.output_dir / relative_output
            try:
                if path.parent not in self._made_dirs:
                    path.parent.mkdir(parents=True, exist_ok=True)  # exist_ok: another thread may race us
                    self._made_dirs.add(path.parent)
                save_atomic(pyramid, path, fsync=self.fsync)
            except Exception as error:
                self._fail(OSError(f"cannot write {path}: {error}"))
                return
            self._written[slot] += 1


# What torch.save adds to the tensors' bytes, as measured: about 1.4 KB for the archive, 0.2 KB per tensor.
FILE_OVERHEAD_BYTES, TENSOR_OVERHEAD_BYTES = 1500, 200
DISK_BLOCK_BYTES = 4096  # a file takes whole blocks of most filesystems


def estimated_file_bytes(level_sizes, hidden_size, flip=False):
    """The disk space one pyramid file takes: levels of sides `level_sizes` ([16, 8, 4, 2, 1]) of `hidden_size`
    float32 channels each, twice with --flip, plus the archive's overhead, rounded up to whole blocks.
    dinov2-base: 1.05 MB (10**6 bytes) a file, 2.1 MB with --flip."""
    tensors = len(level_sizes) * (2 if flip else 1)
    data = sum(side * side for side in level_sizes) * hidden_size * 4 * (2 if flip else 1)
    size = data + FILE_OVERHEAD_BYTES + TENSOR_OVERHEAD_BYTES * tensors
    return -(-size // DISK_BLOCK_BYTES) * DISK_BLOCK_BYTES
