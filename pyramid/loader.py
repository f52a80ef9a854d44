"""Batches for training, read ahead on a background thread into reused memory: PyramidDataset.loader().

    loader = PyramidDataset(root, levels=["4x4", "8x8"]).loader(64, shuffle=True, device="cuda")
    for epoch in range(epochs):
        for batch in loader:                  # one pass = one epoch, a new order each pass
            batch["8x8"]                      # (64, 64, D) in the stored dtype, on the GPU

    loader = dataset.loader(64, dtype=torch.float32)  # float32 batches from a bf16 or fp16 tree

A thread reads whole batches ahead of use (a gather per level from the pack's memory-mapped arrays or
from a CPU preload, or one preadv per file straight into the batch; all of them release the GIL) into a
few buffers that are used again and again, each once nothing of its last batch is left (PyramidLoader
says the rule), so a step costs no allocation and no page fault; a few more threads each read a part of
the batch's rows, since one thread's copy into a batch far larger than the CPU's caches runs at a
fraction of what the memory can take. Batches for a CUDA device are read into
pinned buffers and copied on a side stream, one batch ahead; from a CUDA preload they are gathered on
the device, with no host traffic at all. Every wait is bounded: a read that never returns (a hung file
system) is raised as a TimeoutError naming its file after `timeout` seconds, a read that fails is raised
naming its file, and a pass left early ends its threads.
"""

import contextlib
import math
import queue
import threading
import time
import weakref
from collections import deque

import numpy as np
import torch

from pyramid.readahead import READ_TIMEOUT, ReadThreads
from pyramid.reader import as_numpy, from_numpy, numpy_dtype
from pyramid.team import cpus_per_process

PREFETCH = 2  # batches read ahead of the one in use
HANDED_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what a loader's dtype= may ask for
MAX_WORKERS = 4  # threads reading one batch by default: enough to keep a server's memory busy
# A part of a gathered batch smaller than this is not worth a thread's hand-over: the pack's and a
# preload's batches are split in parts of at least this many bytes.
MIN_GATHER_PART_BYTES = 1 << 20
POLL_SECONDS = 0.1  # how often a waiting thread looks at whether its peer is still there
# How long a pass that ends waits for its threads' reads in flight; a slower read (a hung file system)
# ends its thread by itself when it returns.
JOIN_SECONDS = 10.0
_END = object()  # what the reading thread puts after the last batch


class PyramidLoader:
    """Batches of a PyramidDataset: `{"name": [B names], level: (B, s*s, D), ...}`, the same values as its
    items (normalised and flipped the same way). Iterating over it is one epoch; len() is the number of
    batches in an epoch.

    `dtype`: the batches' dtype. None: the items' (`dataset.dtype`: the stored dtype, float32 when
    normalised). torch.float32 widens bf16 or fp16 files exactly; torch.bfloat16 or torch.float16 rounds
    to nearest even. Read in the stored dtype, converted after reading (for a device, after the copy
    there: a bf16 tree moves half the bytes of an fp32 one).

    `shuffle`: every epoch in its own order, a pure function of (`seed`, epoch): the same on every run
    and every rank. Epochs count from 0 and go up by one per pass; `set_epoch(k)` makes the next pass
    epoch k (to resume). Unshuffled, the items come in the dataset's (sorted-name) order.

    `flip="random"` datasets: whether an item is read from its flip/ twins is drawn from the same
    generator (see `plan`), so it is reproducible too, and independent of torch's global generator.

    `drop_last`: leave out the last batch of an epoch when it is smaller than `batch_size`.

    `device`: None gives the batches where the data is (CPU memory, or the device of a CUDA preload)
    in the loader's own reused buffers; a device (e.g. "cuda") gives new tensors there, copied from
    pinned buffers with non_blocking copies on a side stream, normalised on that device. device="cpu"
    gives each batch in new memory (one more copy per batch).

    `prefetch`: batches read ahead of the one in use. `set_reading(workers, timeout)`: the threads that
    read each batch, each a part of its rows (default: up to 4, within the CPUs this process may use),
    and the seconds to wait for a batch before raising TimeoutError naming the files still being read
    (default 600: a hung file system, not a slow one). A failed read raises its error, naming its file,
    where the batches are used.

    A batch is yours for as long as you hold it (device=None; a device's batches are new tensors there).
    Each batch is read into one of the loader's buffers, kept from epoch to epoch, that is free: nothing of
    the batch it last held is left, no tensor, view, numpy array or storage of it. The loader is told the
    moment the last of them is freed (it watches the arrays the batch's tensors are made over), so this
    holds wherever you keep a batch, and does not depend on timing. It keeps prefetch + 3 buffers (the
    batch your loop holds, the next one on its way to it, `prefetch` read ahead, one being read): a loop
    that holds nothing past its step reads every batch into the same prefetch + 3 buffers, epoch after
    epoch. When none is free (you keep batches), the batch is read into new memory, which takes the place
    of one of those you hold: what you hold stays yours until you drop it.

    Under torch.distributed (initialised before iterating; or `rank` and `world_size` given, see `set_ranks`), every
    rank computes the same epoch order (same `seed` on every rank) and takes its own contiguous part
    of it: N // world_size items each, so every rank runs the same number of steps. The N % world_size
    items at the end of the epoch's order are left out of that epoch (different ones every epoch when
    shuffled); nothing is served twice (DistributedSampler pads with duplicates instead). `drop_last`
    then applies to each rank's part.
    """

    def __init__(self, dataset, batch_size, shuffle=False, drop_last=False, seed=0, device=None, prefetch=PREFETCH,
                 dtype=None):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, not {batch_size!r}.")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, not {seed!r}.")
        if not isinstance(prefetch, int) or prefetch < 1:
            raise ValueError(f"prefetch must be a positive integer, not {prefetch!r}.")
        if dtype is not None and dtype not in HANDED_OUT_DTYPES:
            raise ValueError(f"dtype must be None (the items' dtype), torch.float32, torch.bfloat16 or "
                             f"torch.float16, not {dtype!r}.")
        self.dtype = dataset.dtype if dtype is None else dtype
        self.dataset, self.batch_size, self.shuffle, self.drop_last = dataset, batch_size, shuffle, drop_last
        self.seed, self.prefetch = seed, prefetch
        self.device = None if device is None else torch.device(device)
        if self.device is not None and self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={device!r}: torch sees no CUDA device here; device=None gives CPU batches.")
        self._rank, self._world_size = None, None
        self.epoch = 0  # the epoch the next pass will be
        self._buffers = None
        self.set_reading()

    def set_reading(self, workers=None, timeout=READ_TIMEOUT):
        """`workers` threads read each batch (None: up to 4, within the CPUs this process may use), and a
        batch not read within `timeout` seconds raises TimeoutError (see the class); returns the loader."""
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
            raise ValueError(f"workers must be a positive integer or None, not {workers!r}.")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}.")
        self.workers = default_workers() if workers is None else workers
        self.timeout = float(timeout)
        return self

    def set_ranks(self, rank, world_size):
        """Take part `rank` of `world_size` of every epoch (both None: torch.distributed's, when initialised)."""
        if (rank is None) != (world_size is None):
            raise ValueError("pass both rank and world_size, or neither (then torch.distributed's are used).")
        if world_size is not None and not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), not {rank} of {world_size}.")
        self._rank, self._world_size = rank, world_size

    def rank_and_world_size(self):
        """(rank, world size): as given, else torch.distributed's when it is initialised, else (0, 1)."""
        if self._rank is not None:
            return self._rank, self._world_size
        distributed = torch.distributed
        if distributed.is_available() and distributed.is_initialized():
            return distributed.get_rank(), distributed.get_world_size()
        return 0, 1

    def set_epoch(self, epoch):
        """Make the next pass epoch `epoch` (its order and flips), e.g. when resuming a run."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative integer, not {epoch!r}.")
        self.epoch = epoch

    def plan(self, epoch):
        """(indices, flipped) of this rank in `epoch`: the dataset indices in the order they are served,
        int64 (n,), and which are read from their flip/ twins, bool (n,) (None without flip="random").

        Drawn from numpy's generator seeded by [seed, epoch]: the permutation of all N items (when
        shuffled), then one bit per dataset index for the flips. Within each batch, the items read from
        the levels come first, then those read from the twins (each group in the epoch's order), so
        that each is one gather."""
        count = len(self.dataset)
        generator = np.random.default_rng([self.seed, epoch])
        order = generator.permutation(count) if self.shuffle else np.arange(count)
        flips = generator.integers(0, 2, count).astype(bool) if self.dataset.flip == "random" else None
        rank, world_size = self.rank_and_world_size()
        share = count // world_size
        indices = order[rank * share:(rank + 1) * share]
        if flips is None:
            return indices, None
        for start in range(0, len(indices), self.batch_size):
            batch = indices[start:start + self.batch_size]
            batch[:] = batch[np.argsort(flips[batch], kind="stable")]
        return indices, flips[indices]

    def __len__(self):
        share = len(self.dataset) // self.rank_and_world_size()[1]
        return share // self.batch_size if self.drop_last else -(-share // self.batch_size)

    def _batches(self, indices, flipped):
        """[(indices, flipped)] per batch of an epoch."""
        stop = len(indices) - len(indices) % self.batch_size if self.drop_last else len(indices)
        return [(indices[start:start + self.batch_size],
                 None if flipped is None else flipped[start:start + self.batch_size])
                for start in range(0, stop, self.batch_size)]

    def __iter__(self):
        epoch, self.epoch = self.epoch, self.epoch + 1
        batches = self._batches(*self.plan(epoch))
        home = self.dataset.preload_device
        if home is not None and home.type != "cpu":
            return self._gathered_on_device(batches, home)
        return self._read_ahead(batches)

    def _gathered_on_device(self, batches, home):
        """Batches of a CUDA preload: per level one index_select on the device (two with flips: the
        batch's items read from the levels, then those from the twins); the epoch's indices go to the
        device once, so a step moves no data between host and device."""
        dataset = self.dataset
        everything = np.concatenate([indices for indices, _ in batches]) if batches else np.zeros(0, np.int64)
        on_device = torch.from_numpy(everything).to(home)
        start = 0
        for indices, flipped in batches:
            rows = on_device[start:start + len(indices)]
            start += len(indices)
            plain = len(indices) if flipped is None else int((~flipped).sum())  # the twins' rows come last
            batch = {"name": [dataset.names[index] for index in indices.tolist()]}
            for level, twin in zip(dataset.levels, dataset._twins):
                batch[level] = torch.empty((len(indices), *dataset._shapes[level]),
                                           dtype=dataset.preloaded[level].dtype, device=home)  # (B, s*s, D)
                torch.index_select(dataset.preloaded[level], 0, rows[:plain], out=batch[level][:plain])
                if plain < len(indices):
                    torch.index_select(dataset.preloaded[twin], 0, rows[plain:], out=batch[level][plain:])
                batch[level] = batch[level].to(self.dtype)
                if self.device is not None and self.device != home:
                    batch[level] = batch[level].to(self.device, non_blocking=True)
            yield batch

    def _read_ahead(self, batches):
        dataset = self.dataset
        shapes = {level: dataset._shapes[level] for level in dataset.levels}
        pinned = self.device is not None and self.device.type == "cuda"
        # A preload holds normalised values; otherwise, with a device, normalising happens there, after
        # the copy (on a GPU: no CPU time).
        normalize_here = self.device is None and dataset.preloaded is None and dataset._scales is not None
        read_dtype = dataset._row_dtype
        # Without a device, batches are read in the stored dtype and staged into buffers of the batches' dtype
        # where they differ (or normalising needs float32); with one, the copier converts on the device.
        staged = self.device is None and (self.dtype != read_dtype or normalize_here and read_dtype != torch.float32)
        out_dtype = self.dtype if staged else read_dtype
        if self._buffers is None or self._buffers.dtypes != (read_dtype, out_dtype):  # kept from epoch to epoch
            self._buffers = _Buffers(lambda: _Buffer(shapes, self.batch_size, pinned, read_dtype, out_dtype),
                                     self.prefetch + 3)
            self._buffers.dtypes = (read_dtype, out_dtype)
        ready = queue.Queue(self.prefetch)
        stop = threading.Event()
        reading = [[None] for _ in range(self.workers)]  # per reading thread: the file it is reading
        reader = threading.Thread(target=_read_batches, name="pyramid-loader", daemon=True,
                                  args=(_BatchReader(dataset, self._parts(shapes), normalize_here,
                                                     reading), batches, self._buffers, ready, stop, self.timeout))
        reader.start()
        copier = None if self.device is None else _Copier(dataset, self.device, normalize=dataset.preloaded is None,
                                                          dtype=self.dtype)
        stuck = False
        try:
            ahead = None  # with a device: the batch to hand over next, while the copy of the one after is under way
            while True:
                try:
                    item = _next_batch(ready, reader, self.timeout, reading)
                except TimeoutError:
                    stuck = True
                    raise
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise item
                buffer, indices, flipped = item
                names = [dataset.names[index] for index in indices.tolist()]
                if copier is None:
                    batch = {"name": names, **{level: from_numpy(array, out_dtype)  # (B, s*s, D), over the buffer
                                               for level, array in buffer.hand_out(len(indices)).items()}}
                    yield batch
                    del batch
                else:
                    copied = copier.copy(buffer, names, flipped)
                    if ahead is not None:
                        yield copier.hand_over(ahead)
                    ahead = copied
            if ahead is not None:
                yield copier.hand_over(ahead)
        finally:
            stop.set()
            # A reader that is not stuck ends within one read of its part of a batch; a stuck one ends
            # when its read returns, by itself.
            reader.join(0 if stuck else min(self.timeout, JOIN_SECONDS))
            _release_unserved(ready)

    def _parts(self, shapes):
        """Into how many parts (one per reading thread) each batch's rows are split: every thread for
        files (each file costs system calls and a copy), fewer for a gather from memory, whose parts
        are each worth a hand-over."""
        if self.dataset.source == "files":
            return self.workers
        row_bytes = sum(math.prod(shape) for shape in shapes.values()) * self.dataset._row_dtype.itemsize
        batch_bytes = self.batch_size * row_bytes
        return max(1, min(self.workers, batch_bytes // MIN_GATHER_PART_BYTES))


def default_workers():
    """Threads that read each batch by default: up to MAX_WORKERS, within this process's share of the CPUs."""
    return min(MAX_WORKERS, cpus_per_process())


def _next_batch(ready, reader, timeout, reading):
    """The reading thread's next item: waits at most `timeout` seconds, and only while the reading
    thread lives; raises TimeoutError naming the files still being read when it has handed nothing
    over for that long."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return ready.get(timeout=POLL_SECONDS)
        except queue.Empty:
            pass
        if not reader.is_alive():
            try:  # it may have handed its last item over just before ending
                return ready.get_nowait()
            except queue.Empty:
                raise RuntimeError("the loader's reading thread ended without a batch or an error; "
                                   "iterate over the loader again to read this epoch anew") from None
        if time.monotonic() > deadline:
            stuck = [slot[0] for slot in reading if slot[0] is not None]
            raise TimeoutError(f"no batch in {timeout:g} s: reading {', '.join(map(str, stuck)) or 'a batch'} "
                               f"has not returned; is its file system hung? (loader.set_reading(timeout=) sets "
                               f"this wait)")


class _Buffer:
    """One batch's worth of host memory, a numpy array (batch_size, s*s, D) per level (views of pinned
    tensors when batches go to a CUDA device): `read` in the dtype the dataset reads, and `arrays`, what
    batches are views of, in `out_dtype` (the same arrays where the dtypes are the same). bfloat16 is held
    as uint16, its raw bits."""

    def __init__(self, shapes, batch_size, pinned, dtype=torch.float32, out_dtype=torch.float32):
        self.tensors = {level: torch.empty((batch_size, *shape), dtype=dtype, pin_memory=True)
                        for level, shape in shapes.items()} if pinned else None
        # numpy allocates large arrays with huge pages: filling them costs fewer page faults.
        self.read = {level: as_numpy(self.tensors[level]) if pinned else np.empty((batch_size, *shape),
                                                                                   numpy_dtype(dtype))
                     for level, shape in shapes.items()}
        self.arrays = self.read if out_dtype == dtype else {
            level: np.empty((batch_size, *shape), numpy_dtype(out_dtype)) for level, shape in shapes.items()}
        self.dtype, self.out_dtype = dtype, out_dtype
        self.busy = True  # taken: being filled, or waiting in the queue
        self.copied = None  # the CUDA event after the last copy out of it
        # The arrays of the batch last handed out, watched: each one's weakref lands in `freed` when it is
        # freed (on whatever thread drops its last reference; deque.append takes no lock, so a garbage
        # collection that frees one inside the loader's own locked code cannot deadlock).
        self.watched, self.freed = [], deque()

    def hand_out(self, rows):
        """The first `rows` rows of each level of `arrays`, as new numpy arrays over them, for the batch to be
        handed out: every tensor made over one (and its views, numpy arrays, storages) holds it, so the buffer
        is free again exactly when the last of them is gone."""
        handed = {level: array[:rows] for level, array in self.arrays.items()}  # (rows, s*s, D) each
        self.freed.clear()
        self.watched = [weakref.ref(array, self.freed.append) for array in handed.values()]
        self.busy = False  # from here on what is watched says whether it is still in use
        return handed

    def free(self):
        if self.busy:
            return False
        if self.copied is not None:
            return self.copied.query()
        return len(self.freed) == len(self.watched)


class _Buffers:
    """The loader's buffers: a free one when there is one, else a new one (kept while fewer than `size`)."""

    def __init__(self, make, size):
        self.make, self.size, self.buffers = make, size, []
        self.dtypes = None  # (read, handed out): the buffers' dtypes
        self.lock = threading.Lock()  # two passes at once each have a reading thread

    def take(self):
        with self.lock:
            return self._take()

    def _take(self):
        for buffer in self.buffers:
            if buffer.free():
                buffer.busy = True
                return buffer
        for buffer in self.buffers:  # a copy out of it still under way: wait for it
            if not buffer.busy and buffer.copied is not None:
                buffer.copied.synchronize()
                buffer.busy = True
                return buffer
        fresh = self.make()
        if len(self.buffers) < self.size:
            self.buffers.append(fresh)
        else:  # all held by batches the caller keeps: they stay theirs, this one takes a place
            held = next((index for index, buffer in enumerate(self.buffers) if not buffer.busy), None)
            if held is not None:
                self.buffers[held] = fresh
        return fresh


def _release_unserved(ready):
    """The buffers of batches read but never handed out (a pass left early), free again."""
    while True:
        try:
            item = ready.get_nowait()
        except queue.Empty:
            return
        if isinstance(item, tuple):
            item[0].busy = False


def _put(ready, item, stop):
    """Queue `item` for the consumer unless it has stopped listening; True if queued."""
    while not stop.is_set():
        try:
            ready.put(item, timeout=POLL_SECONDS)
            return True
        except queue.Full:
            pass
    return False


class _BatchReader:
    """Reads a batch's rows into a buffer in `parts` parts: the first on the calling thread, the others
    on read threads (the reads release the GIL, so the parts' copies run side by side)."""

    def __init__(self, dataset, parts, normalize, reading):
        self.dataset, self.parts, self.normalize, self.reading = dataset, parts, normalize, reading
        # Torch's elementwise ops run on its own intra-op threads when it has more than one: called from
        # several threads at once, each call would start a team of its own. Then the whole batch is
        # normalised (and converted into the batches' dtype) once, on the reading thread.
        self.finish_parts = torch.get_num_threads() == 1

    def read(self, buffer, indices, flipped, threads, stop):
        """Fill `buffer`'s first len(indices) rows; False if `stop` was set before every part was read."""
        count = len(indices)
        parts = min(self.parts, count)
        bounds = [count * part // parts for part in range(parts + 1)]
        calls = [threads.submit(self.read_part, buffer, indices, flipped, bounds[part], bounds[part + 1], part)
                 for part in range(1, parts)]
        self.read_part(buffer, indices, flipped, bounds[0], bounds[1], 0)
        for call in calls:
            while not call.done.wait(POLL_SECONDS):
                if stop.is_set():
                    return False
            call.outcome()
        if not self.finish_parts:
            self.finish(buffer, 0, count, flipped)
        return True

    def finish(self, buffer, start, end, flipped):
        """Rows [start, end) as batches hold them: normalised (in float32) where the batch is used on the CPU,
        in the batches' dtype (`buffer.arrays`); rows are finished on their own, so a part gives the values
        the whole batch would."""
        if not self.normalize and buffer.arrays is buffer.read:
            return
        rows = {level: from_numpy(array[start:end], buffer.dtype) for level, array in buffer.read.items()}
        if self.normalize:
            rows = self.dataset._as_items(rows, flipped)  # float32, normalised (in place when read in float32)
        for level, tensor in rows.items():  # into the arrays handed out, in their dtype, unless it is there
            handed_out = from_numpy(buffer.arrays[level][start:end], buffer.out_dtype)
            if handed_out.data_ptr() != tensor.data_ptr():
                handed_out.copy_(tensor)

    def read_part(self, buffer, indices, flipped, start, end, part):
        """Rows [start, end) of the batch: read, then finished (see `finish`) here where torch runs on one
        thread."""
        rows = {level: array[start:end] for level, array in buffer.read.items()}
        flipped = None if flipped is None else flipped[start:end]
        reading = self.reading[part]
        self.dataset._read_rows(indices[start:end], flipped, rows, reading)
        if self.finish_parts:
            self.finish(buffer, start, end, flipped)
        reading[0] = None


def _read_batches(reader, batches, pool, ready, stop, timeout):
    """The reading thread: each batch into a free buffer (its parts on read threads), then onto the queue;
    an error goes on the queue too, so it is raised where the batches are used."""
    threads = ReadThreads(reader.parts - 1, "pyramid-loader-read")
    buffer = None  # taken, and not yet queued
    try:
        for indices, flipped in batches:
            if stop.is_set():
                return
            buffer = pool.take()
            if not reader.read(buffer, indices, flipped, threads, stop):
                return
            if not _put(ready, (buffer, indices, flipped), stop):
                return
            buffer = None
        _put(ready, _END, stop)
    except BaseException as error:  # noqa: BLE001 - handed to the consumer, which raises it
        _put(ready, error, stop)
    finally:
        threads.close(wait=min(timeout, JOIN_SECONDS))
        if buffer is not None and not any(thread.is_alive() for thread in threads.threads):
            buffer.busy = False  # a pass left early, or a failed read: no read writes into it any more


class _Copier:
    """Copies host buffers to the loader's device: into new tensors there, on a side stream for CUDA
    (pinned source, non_blocking), then normalised there."""

    def __init__(self, dataset, device, normalize, dtype=torch.float32):
        self.dataset, self.device, self.normalize, self.dtype = dataset, device, normalize, dtype
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def copy(self, buffer, names, flipped):
        count = len(names)
        batch = {"name": names}
        context = torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        with context:
            levels = {}
            for level, array in buffer.arrays.items():  # in the dtype read: a 2-byte dtype moves half the bytes
                source = buffer.tensors[level] if buffer.tensors is not None else from_numpy(array, buffer.dtype)
                shape = (count, *array.shape[1:])  # (B, s*s, D)
                levels[level] = (from_numpy(np.empty(shape, array.dtype), buffer.dtype)  # huge pages
                                 if self.device.type == "cpu"
                                 else torch.empty(shape, dtype=buffer.dtype, device=self.device))
                levels[level].copy_(source[:count], non_blocking=self.stream is not None)
                del source
            if self.normalize:
                levels = self.dataset._as_items(levels, flipped)  # float32, normalised there
            batch.update({level: tensor.to(self.dtype) for level, tensor in levels.items()})
            done = None
            if self.stream is not None:
                done = torch.cuda.Event()
                done.record(self.stream)
        buffer.copied = done
        buffer.busy = False
        return batch, done

    def hand_over(self, copied):
        """The batch of copy(), safe to use on the current stream: that stream waits for its copy (not for
        the next one, already under way), and its memory is not reused before that stream is done with it."""
        batch, done = copied
        if done is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(done)
            for key, tensor in batch.items():
                if key != "name":
                    tensor.record_stream(current)
        return batch
