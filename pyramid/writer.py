"""Atomic .pt writes on background threads, and the failures.jsonl record."""

import errno
import io
import os
import queue
import stat
import threading
from pathlib import Path

from pyramid.ptzip import ArchiveLayout, NotPlain
from pyramid.team import cpus_per_process
from pyramid.tree import (
    FAILURES_NAME,
    STORE_BYTES,
    append_json_line,
    failure_line,
    readable_text,
    reserved_output,
    temporary_name,
    writer_tag,
)

# Write errors that concern one file, not the disk: a name the file system refuses (too long, bytes it does
# not take), something in the way (a folder where the file goes, a file where a folder goes), a folder this
# process may not write. Such a file is that image's recorded failure, and the run goes on. Any other error
# (ENOSPC, EDQUOT, EROFS, EIO, ...) would fail every file after it: it stops the run as a write error.
ONE_FILE_ERRNOS = frozenset({errno.ENAMETOOLONG, errno.EILSEQ, errno.EINVAL, errno.EISDIR, errno.ENOTDIR,
                             errno.EEXIST, errno.ENOTEMPTY, errno.ELOOP, errno.EACCES, errno.EPERM, errno.EBUSY,
                             errno.ETXTBSY})


class LinkedFolder(Exception):
    """A folder of the output tree that an image's file would go into is a symbolic link."""


def save_atomic(obj, path, fsync=False):
    """torch.save `obj` to `path` through a hidden temporary in the same directory and a rename.

    A path that exists is therefore complete while the machine stays up; on any error the temporary is
    removed. With `fsync` the file's data reaches the disk before the rename and the rename before
    returning, so the file also survives a node crash or power loss (see docs/scale.md for the cost).
    """
    import torch  # here, not at the top: the tools that import this module answer --help without torch

    buffer = io.BytesIO()
    # Serialised in memory, then written by plain file I/O: a full disk (or any failing write) then
    # raises OSError "No space left on device", where torch.save to a path reports only
    # "[enforce fail at inline_container.cc] unexpected pos".
    torch.save(obj, buffer)
    write_atomic([buffer.getbuffer()], path, fsync=fsync)


def write_atomic(pieces, path, fsync=False):
    """Write the bytes of `pieces` (bytes-like objects, in order) to `path` as save_atomic does: a hidden
    temporary in the same directory, then a rename; `fsync` as there.

    One os.writev takes all the pieces: nothing is joined in Python, and the GIL is free while the
    kernel copies them.
    """
    path = Path(path)
    temporary = temporary_name(path, writer_tag())
    try:
        fd = _create(temporary)
        try:
            _write_all(fd, pieces)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
        if fsync:
            _fsync_directory(path.parent)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _create(temporary):
    """Open a new file at `temporary` for writing. Never through a link (one planted at the name would send
    the bytes outside the tree): a leftover of the same name is this writer's (its tag names this host,
    process and thread), from a dead process whose pid came back, and is replaced."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    try:
        return os.open(temporary, flags, 0o666)
    except FileExistsError:
        os.unlink(temporary)
        return os.open(temporary, flags, 0o666)


def make_folders(root, relative):
    """Create the folders `relative` (a relative path) under `root` where missing, and check that each is a
    real folder: a symbolic link among them raises LinkedFolder, so no file of the extractor lands outside
    `root` (or in another folder of the tree, under a second name); a file among them, NotADirectoryError."""
    folder = Path(root)
    folder.mkdir(parents=True, exist_ok=True)  # the output directory itself may be a link: the user's choice
    for part in Path(relative).parts:
        folder = folder / part
        try:
            os.mkdir(folder)
            continue
        except FileExistsError:  # already there (another thread may have made it a moment ago)
            pass
        mode = os.lstat(folder).st_mode
        if stat.S_ISLNK(mode):
            raise LinkedFolder(f"{folder} is a symbolic link, and the extractor writes only into real folders of "
                               f"the output directory, so that nothing lands outside it; make it a folder")
        if not stat.S_ISDIR(mode):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), os.fspath(folder))


def _write_all(fd, pieces):
    """os.writev until every byte of `pieces` is written (a regular file may take fewer bytes at a time)."""
    views = [memoryview(piece).cast("B") for piece in pieces]
    while views:
        written = os.writev(fd, views)
        if written == 0 and any(view.nbytes for view in views):
            raise OSError("the file took no bytes")
        while views and written >= views[0].nbytes:
            written -= views[0].nbytes
            views.pop(0)
        if written:
            views[0] = views[0][written:]


def _fsync_directory(directory):
    """Make a rename in `directory` durable: its entry is data of the directory, not of the file."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def record_failure(output_dir, relative_path, message):
    """Append the failures.jsonl line of an image (tree.failure_line; tree.append_json_line: one write with
    O_APPEND, so lines from several processes never interleave)."""
    append_json_line(Path(output_dir) / FAILURES_NAME, failure_line(relative_path, message))


def default_writer_threads():
    """Writer threads per process: up to 4, and no more than the CPUs this process may use.

    A base-size pyramid is a 1 MB file: its CRC32s and the copy into the page cache, the bulk of the
    work, run without the GIL (ArchiveLayout), so threads add up until the cores or the disk are the
    limit; a GPU fed 256x256 PNGs needs more than one (docs/gpu.md has the figures). Idle threads
    sleep, so a CPU-only run loses nothing.
    """
    return min(4, cpus_per_process())


SERIALISERS = ("layout", "torch.save")
# How often a wait on the writer's queue looks whether its threads are still alive.
LIVENESS_SECONDS = 1.0


class WriterGone(RuntimeError):
    """The writer's threads ended without being asked to: what was queued will never be written."""


def checked_layout(levels):
    """The ArchiveLayout of the images of `levels` ({key: (B, S*S, D) CPU tensor, fp32, bf16 or fp16}), once its
    file of the first image is torch.save's, byte for byte; None where torch.save lays its archive out otherwise."""
    import torch

    try:
        layout = ArchiveLayout({key: (1, *value.shape[1:]) for key, value in levels.items()},
                               {key: value.dtype for key, value in levels.items()})
    except NotPlain:
        return None
    expected = io.BytesIO()
    torch.save({key: value[0:1].clone() for key, value in levels.items()}, expected)
    rows = [memoryview(raw_array(value[0])).cast("B") for value in levels.values()]
    return layout if b"".join(layout.pieces(rows)) == expected.getvalue() else None


def raw_array(tensor):
    """A numpy array over a contiguous CPU tensor's memory, whatever its dtype: numpy has no bfloat16, so a
    bfloat16 tensor's values are seen as their raw 16 bits (uint16); the bytes are the tensor's either way."""
    import torch

    return (tensor.view(torch.uint16) if tensor.dtype == torch.bfloat16 else tensor).numpy()


def _image_pyramid(levels, index):
    """Image `index` of a batch as tensors that own their memory, copied by numpy: one thread, the GIL free.

    torch's clone copies on its intra-op thread pool, which in writer threads competes with the decode
    workers and the other writers for the cores; on two busy cores one 1 MB clone took 8 ms of CPU
    (spinning at OpenMP barriers) instead of 0.2 ms.
    """
    import torch

    return {key: torch.from_numpy(raw_array(value[index:index + 1]).copy()).view(value.dtype)
            for key, value in levels.items()}


class Writer:
    """Writes batches as one file per image on `threads` background threads, so neither serialising
    nor writing ever stalls the forward pass.

    Each thread takes a whole batch (after waiting for its `ready` event when the values are still
    arriving from the GPU), writes its files straight from the batch's memory, then hands that memory
    back through the batch's `release`. The files are torch.save's bytes: made by ArchiveLayout
    (`serialise="layout"`, the GIL mostly free) or by torch.save itself (`"torch.save"`, and for any
    layout ArchiveLayout does not reproduce; `layouts` says which). `submit_batch` blocks only when
    `max_pending` batches wait, so the memory held stays a few batches whatever the run's size. A
    file that cannot be written for a reason of its own is its image's failure (`on_unwritable`); any other
    write error (a full disk) stops the writer, and `check` raises it in the caller's thread. `close` waits for
    every submitted file. Neither waits on threads that are gone: WriterGone once none is left.
    """

    def __init__(self, output_dir, max_pending=4, threads=1, fsync=False, serialise="layout"):
        if serialise not in SERIALISERS:
            raise ValueError(f"serialise must be one of {SERIALISERS}, not {serialise!r}")
        self.output_dir = Path(output_dir)
        self.fsync = fsync
        self.serialise = serialise
        self.queue = queue.Queue(maxsize=max_pending)
        self.error = None
        self.layouts = {}  # {((key, per-image shape, dtype), ...): ArchiveLayout, or None where torch.save writes}
        self._layouts_lock = threading.Lock()
        self._error_lock = threading.Lock()
        self._written = [0] * threads  # one counter per thread: no lock on the hot path
        self._non_finite = [0] * threads
        self._unwritable = [0] * threads
        self._made_dirs = set()
        self._ended = [False] * threads  # per thread: took its end marker (not ended by an error)
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

    @property
    def unwritable(self):
        """Images whose file could not be written for a reason of its own, each handed to `on_unwritable`."""
        return sum(self._unwritable)

    def submit_batch(self, relative_outputs, levels, ready=None, release=None, finite=None, on_non_finite=None,
                     on_unwritable=None):
        """Queue one batch: output paths (B,) and {"16x16": (B, 256, D), ...} CPU tensors in the files' dtype.

        `ready` (a CUDA event, or None) completes once `levels` hold their values: the writer waits
        for it, never the caller. `release()` is called once the batch's files are written (also
        after an error), so the caller may reuse that memory. `finite`, (B, k) bool arriving with the
        levels, flags each image's parts (the image, its mirror); an image with a False flag gets no
        file, and `on_non_finite(position in the batch, its flags as a list)` is called instead, on a
        writer thread. A file that cannot be written for a reason of its own (write_batch) is
        `on_unwritable(relative output, why)`'s, on a writer thread; without it, a write error of the run.
        """
        self.check()
        self._put((relative_outputs, levels, ready, release, finite, on_non_finite, on_unwritable))

    def check(self):
        if self.error is not None:
            raise self.error

    def check_alive(self):
        """WriterGone when no writer thread is left to take what is queued (they ended on an error that is
        not an Exception); the first write error instead, as `check`, where there was one."""
        if not any(thread.is_alive() for thread in self._threads):
            self.check()
            raise WriterGone(f"the writer's {len(self._threads)} thread(s) ended unexpectedly; the files "
                             f"queued for them are not written, rerun to write them")

    def _put(self, item):
        """queue.put, waiting only while a writer thread is alive to take from the queue."""
        while True:
            try:
                self.queue.put(item, timeout=LIVENESS_SECONDS)
                return
            except queue.Full:
                self.check_alive()

    def close(self):
        """Wait for every submitted file; WriterGone where a thread ended before its end marker (its batch,
        and any left in the queue, are not written)."""
        for _ in self._threads:
            self._put(None)
        for thread in self._threads:
            thread.join()  # alive until it takes its end marker, or gone already: either way it ends
        self.check()
        lost = self._ended.count(False)
        if lost:
            raise WriterGone(f"{lost} of the writer's {len(self._threads)} thread(s) ended unexpectedly; the "
                             f"files queued for them are not written, rerun to write them")

    def _fail(self, error):
        with self._error_lock:
            if self.error is None:
                self.error = error

    def _loop(self, slot):
        self._serve(slot)
        self._ended[slot] = True

    def _serve(self, slot):
        while (item := self.queue.get()) is not None:
            relative_outputs, levels, ready, release, finite, on_non_finite, on_unwritable = item
            try:
                if self.error is None:  # after an error, drain so submit_batch never blocks forever
                    if ready is not None:
                        ready.synchronize()
                    if finite is not None:
                        relative_outputs, levels = self._drop_non_finite(slot, relative_outputs, levels, finite,
                                                                         on_non_finite)
                    unwritable = self.write_batch(slot, relative_outputs, levels)
                    self._report_unwritable(slot, unwritable or [], on_unwritable)
            except Exception as error:  # a failed device copy: raised in the run loop by check()
                self._fail(error)
            finally:
                del item, levels, finite  # the batch's memory goes back now, not when the next batch arrives
                if release is not None:
                    release()

    def _drop_non_finite(self, slot, relative_outputs, levels, finite, on_non_finite):
        """The batch's outputs and levels without the images flagged non-finite, each reported. The
        levels are kept as they are when every image is finite (the common case: no copy)."""
        flags = finite.reshape(len(relative_outputs), -1).tolist()  # [[image, mirror], ...]
        kept = [position for position, image_flags in enumerate(flags) if all(image_flags)]
        if len(kept) == len(relative_outputs):
            return relative_outputs, levels
        for position, image_flags in enumerate(flags):
            if not all(image_flags):
                try:
                    on_non_finite(position, image_flags)
                except OSError as error:  # failures.jsonl cannot be written: the run's write error
                    self._fail(error)
                    return [], {}
                self._non_finite[slot] += 1
        return [relative_outputs[position] for position in kept], {key: value[kept] for key, value in levels.items()}

    def _report_unwritable(self, slot, unwritable, on_unwritable):
        """Hand each file write_batch could not write to `on_unwritable`; without it (or where it cannot
        record one: failures.jsonl unwritable), the first is the run's write error."""
        for relative_output, why in unwritable:
            try:
                if on_unwritable is None:
                    raise OSError(why)
                on_unwritable(relative_output, why)
            except OSError as error:
                self._fail(error)
                return
            self._unwritable[slot] += 1

    def write_batch(self, slot, relative_outputs, levels):
        """Write the file of each image of `levels` on writer thread `slot`. Returns [(relative output, why)]
        of the files not written for a reason of their own: a name the tree keeps for itself
        (tree.reserved_output), a folder on the way that is a link (make_folders), an error of ONE_FILE_ERRNOS.
        Any other error is kept for `check` and ends the batch. A subclass may wrap it (tests slow it down)."""
        if not relative_outputs:
            return []
        levels = {key: value.contiguous() for key, value in levels.items()}  # the run's: as they are
        layout = self._layout(levels)
        if layout is None:  # each image copied out: torch.save of a view would store the whole batch
            files = (_image_pyramid(levels, i) for i in range(len(relative_outputs)))
        else:
            flat = [(memoryview(raw_array(value)).cast("B"), value[0].numel() * value.element_size())
                    for value in levels.values()]
            files = ([view[i * size:(i + 1) * size] for view, size in flat] for i in range(len(relative_outputs)))
        unwritable = []
        for relative_output, content in zip(relative_outputs, files):
            if self.error is not None:
                break
            path = self.output_dir / relative_output
            why = reserved_output(relative_output)
            if why is None:
                try:
                    if path.parent not in self._made_dirs:
                        make_folders(self.output_dir, Path(relative_output).parent)
                        self._made_dirs.add(path.parent)
                    if layout is None:
                        save_atomic(content, path, fsync=self.fsync)
                    else:
                        write_atomic(layout.pieces(content), path, fsync=self.fsync)
                except LinkedFolder as error:
                    why = f"cannot write {readable_text(str(path))}: {error}"
                except Exception as error:
                    message = readable_text(f"cannot write {path}: {error}")
                    if not (isinstance(error, OSError) and error.errno in ONE_FILE_ERRNOS):
                        self._fail(OSError(message))
                        break
                    why = message
            if why is None:
                self._written[slot] += 1
            else:
                unwritable.append((relative_output, why))
        return unwritable

    def _layout(self, levels):
        """The checked ArchiveLayout of these levels' shapes, made once per shape; None: torch.save."""
        if self.serialise == "torch.save":
            return None
        shapes = tuple((key, tuple(value.shape[1:]), value.dtype) for key, value in levels.items())
        with self._layouts_lock:
            if shapes not in self.layouts:
                self.layouts[shapes] = checked_layout(levels)
            return self.layouts[shapes]


# What torch.save adds to the tensors' bytes, as measured: about 1.4 KB for the archive, 0.2 KB per tensor.
FILE_OVERHEAD_BYTES, TENSOR_OVERHEAD_BYTES = 1500, 200
DISK_BLOCK_BYTES = 4096  # a file takes whole blocks of most filesystems


def estimated_file_bytes(level_sizes, hidden_size, flip=False, store_dtype="fp32"):
    """The disk space one pyramid file takes: levels of sides `level_sizes` ([16, 8, 4, 2, 1]) of `hidden_size`
    channels each in `store_dtype` (4 bytes a value for fp32, 2 for bf16 and fp16), twice with --flip, plus
    the archive's overhead, rounded up to whole blocks. dinov2-base: 1.05 MB (10**6 bytes) a file in fp32,
    2.1 MB with --flip; 0.53 MB in bf16 or fp16."""
    tensors = len(level_sizes) * (2 if flip else 1)
    data = sum(side * side for side in level_sizes) * hidden_size * STORE_BYTES[store_dtype] * (2 if flip else 1)
    size = data + FILE_OVERHEAD_BYTES + TENSOR_OVERHEAD_BYTES * tensors
    return -(-size // DISK_BLOCK_BYTES) * DISK_BLOCK_BYTES
