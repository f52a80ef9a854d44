"""PyramidDataset, the reader for the training phase: items, DataLoader batches, loader(), preload."""

import math
import mmap
import os
import threading
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate, get_worker_info

from pyramid.exits import DamagedFile
from pyramid.loader import PyramidLoader
from pyramid.readahead import read_ahead
from pyramid.reader import STORED_DTYPES, as_numpy, expected_from, from_numpy, read_pyramid
from pyramid.team import cpus_per_process, usable_memory
from pyramid.tree import (
    FLIP_PREFIX,
    MANIFEST_NAME,
    STATS_NAME,
    available_levels,
    current_pack,
    flip_twin,
    item_name,
    pack_command,
    pack_dir,
    stats_current,
    stored_dtype,
    tree_state,
)
from pyramid.validate import open_regular, pack_arrays

FLIP_CHOICES = (False, "random")
PRELOAD_CHUNK_BYTES = 32 << 20  # the items read per step of a preload, as bytes


class Batch(list):
    """The items of a batch read by PyramidDataset.__getitems__ (dicts of row views), with `collated`:
    the same batch as default_collate makes it, already one tensor per level."""

    def __init__(self, items, collated):
        super().__init__(items)
        self.collated = collated


def collate(items):
    """DataLoader collate_fn for PyramidDataset: a batch read by __getitems__ is already stacked, so it
    is handed on without the copy default_collate makes; anything else goes to default_collate."""
    return items.collated if isinstance(items, Batch) else default_collate(items)


def host_empty(shape, dtype=torch.float32, shared=False):
    """A CPU tensor for a batch or a preload; in shared memory inside a DataLoader worker (`shared`), as
    default_collate makes its output, so it reaches the main process without another copy.

    Elsewhere numpy allocates it: numpy asks the kernel for huge pages on large arrays, so filling a
    fresh 50 MB batch costs 7 ms instead of torch.empty's 50 ms of 4 KiB page faults (measured here), and
    a gather from a preload takes one TLB entry per 2 MB instead of per 4 KiB.
    """
    size = math.prod(shape) * dtype.itemsize
    if shared:
        return torch.empty(0, dtype=dtype).set_(torch.UntypedStorage._new_shared(size), 0, shape)
    return torch.from_numpy(np.empty(size, np.uint8)).view(dtype).view(shape)


def free_memory(device):
    """Bytes that can still be allocated on `device` (a torch.device), or None where unknown: free CUDA
    memory, or the memory available to this process (team.usable_memory: MemAvailable, within its cgroups'
    limits)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return usable_memory()


class PyramidDataset(Dataset):
    """The pyramid files below `root`, in sorted order, one item per image.

    Item i is a dict: `"name"` is the image's path relative to `root` without its suffix, as a POSIX
    string (`"a/b/c"` for `a/b/c.pt`, made from `a/b/c.jpg`), and one tensor of shape `[s*s, D]` per
    level asked for (the stored `[1, s*s, D]` without its leading 1), so the default collate gives
    `{"name": [B names], "8x8": (B, 64, D), ...}`. The tensors hold the stored dtype (`self.stored_dtype`:
    float32, or bfloat16 / float16 for a tree extracted with --store_dtype), float32 when normalised
    (`self.dtype` says which); `loader(..., dtype=torch.float32)` hands out float32 batches of any tree.

    `levels`: a list of level names such as `["4x4", "8x8"]`; None means every plain level. Only the
    levels asked for are read from disk. The available levels are those of manifest.json (with their
    `flip/` twins when it says flip), or of the first file when there is no manifest.

    `normalize=True`: each level becomes `(x - mean) / std` per channel, computed in float32 (so the
    items are float32 whatever the stored dtype), with the mean and std of the level actually read from
    `root/stats.pt` (`python -m pyramid.stats`); refused when stats.pt is missing or was computed from
    other files.

    `flip="random"`: per item, either the levels or their `flip/` twins (the mirrored image), under the
    plain keys, each with probability 1/2. Items draw from torch's random generator: seeded by
    torch.manual_seed in the main process, and per worker and epoch by the DataLoader as usual;
    `loader()` draws from its own epoch's generator (see PyramidLoader.plan).

    Reading: `dataset.loader(batch_size, shuffle=True)` (pyramid.loader) is the fast way: whole batches
    read ahead on a background thread into reused memory. `DataLoader(dataset, batch_size=B,
    collate_fn=PyramidDataset.collate)` reads each batch through `__getitems__` straight into one
    (B, s*s, D) tensor per level (in shared memory inside a worker); the default collate_fn gives the
    same batches after one more copy.

    `pack`: "auto" reads `root/pack/` (`python -m pyramid.pack`) when it is current and holds the
    levels, and the files otherwise; True requires a current pack; False always reads the files. The
    items are the same either way. Which one is used is `self.source`: "pack" or "files". The pack's
    arrays are memory-mapped: a batch is one gather per level, at the speed of memory once the pages
    are in the page cache.

    `preload`: None, "cpu", "cuda" or a torch.device: the levels asked for (with their flip/ twins for
    flip="random"; normalised when asked) are read once, at construction, from the pack or the files
    into one [N, s*s, D] tensor per level in that memory, of the items' dtype (a bf16 tree takes half
    the memory of an fp32 one unless normalised) (`self.preloaded`, on `self.preload_device`),
    and items and loader batches are served from there (`self.source` is then "preload"); refused with
    MemoryError, naming the size, when they do not fit in the memory free there. Items of a CUDA preload
    are CUDA tensors; use `loader()` (or num_workers=0) with it.
    """

    def __init__(self, root, levels=None, normalize=False, flip=False, pack="auto", preload=None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root} is not a directory; pass the extractor's --output_dir.")
        if flip not in FLIP_CHOICES:
            raise ValueError(f"flip must be False or 'random', not {flip!r}.")
        if pack not in ("auto", True, False):
            raise ValueError(f"pack must be 'auto', True or False, not {pack!r}.")
        preload_device = _preload_device(preload)
        manifest, records = tree_state(self.root)  # one stat per file: what the pack and stats are checked by
        self._expect = expected_from(manifest)  # what every file must hold, checked once per layout by the reader
        self.files = [entry[0] for entry in records]  # relative POSIX paths, sorted as strings
        self.names = [item_name(relative) for relative in self.files]
        self._paths = [os.path.join(self.root, relative) for relative in self.files]
        available = available_levels(self.root, manifest, self.files[0] if self.files else None)
        if levels is None:
            levels = [level for level in available if not level.startswith(FLIP_PREFIX)]
        elif isinstance(levels, str):
            raise TypeError(f"levels must be a list of level names such as [{levels!r}], not a string.")
        unknown = [level for level in levels if level not in available]
        if unknown and available:
            raise ValueError(f"unknown level(s) {unknown}; available: {available}.")
        self.levels = list(levels)
        self.flip = flip
        self.stored_dtype = self._stored_dtype(manifest)
        if flip and available:
            unflippable = [level for level in self.levels if flip_twin(level) not in available]
            if unflippable:
                raise ValueError(f"flip='random' needs the flip/ twins of {unflippable}, which these files do "
                                 f"not have; extract with --flip.")
        self._twins = [flip_twin(level) for level in self.levels]
        self.sources = self.levels + (self._twins if flip else [])
        self._pack = self._choose_pack(pack, manifest, records)
        self.source = "files" if self._pack is None else "pack"
        self._shapes = self._level_shapes()
        self._scales = self._load_scales(manifest, records) if normalize else None
        self.dtype = torch.float32 if normalize else self.stored_dtype  # the items'; normalised in float32
        self._scales_on = {}  # the scales copied to each device that normalises
        self._open_pid, self._pack_arrays_open, self._open_lock = None, None, threading.Lock()
        different = [level for level in self.levels if flip and self._shapes[flip_twin(level)] != self._shapes[level]]
        if different:
            raise ValueError(f"the flip/ twins of {different} have other shapes than the levels")
        self.preloaded = None  # {source level: (N, s*s, D) tensor}, flip/ twins included with flip="random"
        self.preload_device = preload_device
        if preload_device is not None:
            self._preload(preload, preload_device)

    collate = staticmethod(collate)

    def _stored_dtype(self, manifest):
        """The torch dtype of the files' levels: the manifest's store_dtype; without a manifest, the first
        file's (float32 where there is none)."""
        name = stored_dtype(manifest)
        if name is not None:
            if name not in STORED_DTYPES:
                raise ValueError(f"{self.root / MANIFEST_NAME} says store_dtype {name!r}, not one of "
                                 f"{', '.join(STORED_DTYPES)}.")
            return STORED_DTYPES[name]
        if not self.files:
            return torch.float32
        pyramid, _ = read_pyramid(self.root / self.files[0], self.levels[:1])
        return next(iter(pyramid.values())).dtype if pyramid else torch.float32

    @property
    def _row_dtype(self):
        """The dtype _read_rows reads: the preload's, or the files' (and the pack's)."""
        return self.preloaded[self.sources[0]].dtype if self.preloaded else self.stored_dtype

    def _level_shapes(self):
        """{level: (s*s, D)} of every source level, from the pack, the manifest or the first file (one small read)."""
        if self._pack is not None:
            return {level: tuple(layout[3]) for level, layout in self._pack.items()}
        if self._expect is not None:
            return {level: self._expect.tensors[level][1][1:] for level in self.sources}
        if not self.files:
            return {}
        pyramid, keys = read_pyramid(self.root / self.files[0], self.sources)
        missing = [source for source in self.sources if source not in pyramid]
        if missing:
            raise ValueError(f"{self.root / self.files[0]} has no level(s) {missing}; it has {keys}.")
        return {level: tuple(tensor.shape[1:]) for level, tensor in pyramid.items()}

    def _choose_pack(self, pack, manifest, records):
        """{level: (path, byte offset of row 0, bytes per row, row shape (s*s, D))} of a current pack, or
        None to read the files."""
        if pack is False or not self.files:
            return None
        record, reasons = current_pack(self.root, manifest, records, self.sources)
        if record is None:
            if pack is True:
                raise ValueError(f"{pack_dir(self.root)} cannot be used: {'; '.join(reasons)}; "
                                 f"run {pack_command(self.root, self.sources)}")
            if reasons != ["no pack"]:
                warnings.warn(f"{pack_dir(self.root)} is not used ({'; '.join(reasons)}): reading the files; "
                              f"{pack_command(self.root, self.sources)} brings it up to date", stacklevel=3)
            return None
        layout = {}
        # Each array's header and size checked against pack.json and the manifest (dtype, C order, shape)
        # before a row is served: a rewritten array is refused, never served as scrambled rows.
        for level, (path, offset, shape, dtype) in pack_arrays(self.root, record, manifest, self.sources).items():
            layout[level] = (path, offset, math.prod(shape[1:]) * np.dtype(dtype).itemsize, shape[1:])
        return layout

    def _load_scales(self, manifest, records):
        """{level: (mean (D,), std (D,)) float32} from stats.pt, after checking it was made from these files."""
        path = self.root / STATS_NAME
        if not path.exists():
            raise FileNotFoundError(f"normalize=True needs {path}; run python -m pyramid.stats {self.root}")
        os.close(open_regular(path))  # a FIFO would block torch.load
        try:
            stats = torch.load(path, weights_only=True)
        except Exception as error:  # noqa: BLE001 - a torn file fails in zip, pickle or torch: all mean the same
            raise DamagedFile(path, f"cannot be read ({type(error).__name__}); rerun python -m pyramid.stats "
                                    f"{self.root}") from None
        if not isinstance(stats, dict):
            raise DamagedFile(path, f"holds a {type(stats).__name__}, not statistics; rerun python -m pyramid.stats "
                                    f"{self.root}")
        if not stats_current(stats, manifest, records):
            raise ValueError(f"{path} was computed from other files than {self.root} holds now "
                             f"({stats.get('count')} files then, {len(records)} now, or some rewritten); "
                             f"rerun python -m pyramid.stats {self.root}")
        missing = [level for level in self.sources if level not in stats]
        if missing:
            raise ValueError(f"{path} has no statistics for {missing}; rerun python -m pyramid.stats {self.root}")
        scales = {}
        for level in self.sources:
            entry = stats[level]
            if not (isinstance(entry, dict) and all(isinstance(entry.get(key), torch.Tensor)
                                                    and entry[key].shape == (self._shapes[level][-1],)
                                                    for key in ("mean", "std"))):
                raise DamagedFile(path, f"the statistics of {level} are not a mean and std of "
                                        f"{self._shapes[level][-1]} channels; rerun python -m pyramid.stats "
                                        f"{self.root}")
            # The mean as a float32 pair (high + low): x - high is exact in float32 wherever x is near the
            # mean, so a channel with a large mean and a small spread keeps float32 precision relative to
            # its spread, where subtracting one rounded float32 mean would lose it.
            mean = stats[level]["mean"]  # (D,) float64
            high = mean.to(torch.float32)
            low = (mean - high.double()).to(torch.float32)
            scales[level] = (high, low, stats[level]["std"].to(torch.float32))
        return scales

    def __len__(self):
        return len(self.files)

    def __getstate__(self):
        state = dict(self.__dict__)
        # Memory maps and locks do not travel to workers (a map would be pickled as its bytes): each
        # process maps the pack itself.
        state["_open_pid"], state["_pack_arrays_open"], state["_open_lock"] = None, None, None
        state["_scales_on"] = {}
        return state

    def __setstate__(self, state):
        self.__dict__.update(state, _open_lock=threading.Lock())

    def loader(self, batch_size, shuffle=False, drop_last=False, seed=0, device=None, rank=None, world_size=None,
               **options):
        """The fast way to iterate: a PyramidLoader (pyramid/loader.py) over this dataset; each pass over
        it is one epoch, of batches {"name": [B names], level: (B, s*s, D), ...}. `rank` and `world_size`
        (both or neither): this process's part of every epoch, where torch.distributed does not say it.
        `options`: PyramidLoader's `prefetch` (batches read ahead, 2) and `dtype` (the batches' dtype;
        None: the items', `self.dtype`; torch.float32 widens a bf16 or fp16 tree exactly)."""
        loader = PyramidLoader(self, batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed, device=device,
                               **options)
        loader.set_ranks(rank, world_size)
        return loader

    def _draw_flips(self, count):
        """Which of `count` items are read from the flip/ twins: None without flip="random", else one
        draw from torch's generator per item, as items have always drawn."""
        if self.flip != "random":
            return None
        return np.array([bool(torch.randint(2, ()).item()) for _ in range(count)])

    def _pack_arrays(self):
        """{source level: (N, s*s, D) tensor} over the pack's arrays, memory-mapped read-only, once per
        process (a DataLoader worker maps its own). The first read of a page maps it in; after that a
        gather is a copy from the page cache at memory speed, with no system call."""
        if self._open_pid != os.getpid():
            with self._open_lock:
                if self._open_pid != os.getpid():
                    arrays = {}
                    for level, (path, offset, row_bytes, shape) in self._pack.items():
                        with open(path, "rb") as file:
                            mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
                        checked = offset + len(self.files) * row_bytes
                        if len(mapped) != checked:
                            raise DamagedFile(path, f"is {len(mapped)} bytes now, not the {checked} it had when "
                                                    f"checked; rerun {pack_command(self.root)}")
                        with warnings.catch_warnings():  # read-only memory: never written, only gathered from
                            warnings.simplefilter("ignore", UserWarning)
                            array = torch.frombuffer(mapped, dtype=self.stored_dtype, offset=offset,
                                                     count=len(self.files) * row_bytes // self.stored_dtype.itemsize)
                        arrays[level] = array.view(len(self.files), *shape)
                    self._pack_arrays_open, self._open_pid = arrays, os.getpid()
        return self._pack_arrays_open

    def _read_rows(self, indices, flipped, rows, reading=None):
        """Read items `indices` into `rows` {level: numpy array (B, s*s, D) of `self._row_dtype`, bf16 as
        uint16}: item indices[k]'s level (its flip/ twin where flipped[k]) into row k. The values as stored:
        not normalised, except from a preload, which holds them normalised (in float32). `reading`: a
        one-element list, set to the file being read (what a read that never returns is stuck on).

        From a preload or the pack: one gather (torch.index_select) per level and group of rows (the
        rows read from the levels, those read from the twins), straight into the batch when the group's
        rows are contiguous (always in loader batches), else through a temporary. From the files: one
        read_pyramid per item, its levels straight into the rows; an error names the file."""
        arrays = self.preloaded if self.preloaded is not None else (
            self._pack_arrays() if self._pack is not None else None)
        if arrays is None:
            for row, index in enumerate(indices):
                sources = self._twins if flipped is not None and flipped[row] else self.levels
                targets = {source: rows[level][row] for level, source in zip(self.levels, sources)}
                path = self._paths[index]
                if reading is not None:
                    reading[0] = path
                try:
                    pyramid, keys = read_pyramid(path, sources, out=targets, expect=self._expect)
                except Exception as error:
                    named = _naming(error, path)
                    if named is error:
                        raise
                    raise named from error
                if len(pyramid) != len(targets):
                    missing = [source for source in sources if source not in pyramid]
                    raise DamagedFile(path, f"has no level {missing[0]!r}; it has {keys}")
            return
        if reading is not None:
            reading[0] = "the CPU preload" if self.preloaded is not None else str(pack_dir(self.root))
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and not 0 <= indices.min() <= indices.max() < len(self.files):
            raise IndexError(f"item indices must be in [0, {len(self.files)}), not {indices.min()} to {indices.max()}")
        positions = np.arange(len(indices))
        groups = [(self.levels, positions)] if flipped is None else [
            (self.levels, positions[~flipped]), (self._twins, positions[flipped])]
        for sources, members in groups:
            if not len(members):
                continue
            contiguous = members[-1] - members[0] + 1 == len(members)
            for level, source in zip(self.levels, sources):
                array = arrays[source]
                if contiguous and array.device.type == "cpu":
                    # numpy's take, over the rows' bytes: one copy per row like index_select, but never
                    # on torch's intra-op threads, which spin for CPU time on a busy machine and would
                    # multiply under the loader's own reading threads. mode="clip": checked above, and
                    # take's default buffers `out`.
                    np.take(_row_bytes(array), indices[members], axis=0, mode="clip",
                            out=_row_bytes(rows[level][members[0]:members[-1] + 1]))
                else:
                    gathered = array.index_select(0, torch.from_numpy(indices[members]).to(array.device)).cpu()
                    from_numpy(rows[level], array.dtype).index_copy_(0, torch.from_numpy(members), gathered)

    def _as_items(self, batch, flipped):
        """A batch as read ({level: (B, s*s, D) tensor of the stored dtype}) as items hold it: itself, or
        normalised in float32 (in place where it is float32 already)."""
        if self._scales is None:
            return batch
        batch = {level: tensor.float() for level, tensor in batch.items()}
        self._normalize(batch, flipped)
        return batch

    def _normalize(self, batch, flipped):
        """Normalise `batch` {level: (B, s*s, D) tensor} in place, each row by the statistics of the level
        it was read from (its flip/ twin's where flipped): the same operations, hence the same values,
        as for one item, on whatever device the batch is."""
        if self._scales is None:
            return
        device = next(iter(batch.values())).device
        scales = self._scales_on.get(device)
        if scales is None:
            scales = self._scales_on[device] = {source: tuple(part.to(device) for part in parts)
                                                for source, parts in self._scales.items()}
        count = next(iter(batch.values())).shape[0]
        plain = count if flipped is None else count - int(flipped.sum())
        grouped = flipped is None or not flipped[:plain].any()  # the twins' rows last, as in loader batches
        for level, twin in zip(self.levels, self._twins):
            tensor = batch[level]
            if grouped:
                parts = [(tensor[:plain], scales[level])] + ([(tensor[plain:], scales[twin])] if plain < count else [])
            else:
                which = torch.as_tensor(flipped, dtype=torch.int64).to(device)
                parts = [(tensor, tuple(torch.stack([mine, its])[which][:, None]  # (B, 1, D) each
                                        for mine, its in zip(scales[level], scales[twin])))]
            for rows, (high, low, std) in parts:
                rows.sub_(high).sub_(low).div_(std)

    def __getitem__(self, index):
        name = self.names[index]  # IndexError past the end, as a list
        index %= len(self.files)
        flipped = self._draw_flips(1)
        sources = self._twins if flipped is not None and flipped[0] else self.levels
        if self.preloaded is not None:
            return {"name": name, **{level: self.preloaded[source][index].clone()
                                     for level, source in zip(self.levels, sources)}}
        if self._pack is not None:  # one copy per level out of the mapped pack
            arrays = self._pack_arrays()
            batch = {level: arrays[source][index:index + 1].clone() for level, source in zip(self.levels, sources)}
        else:
            batch = {level: torch.empty((1, *self._shapes[level]), dtype=self.stored_dtype) for level in self.levels}
            self._read_rows([index], flipped, {level: as_numpy(tensor) for level, tensor in batch.items()})
        batch = self._as_items(batch, flipped)
        return {"name": name, **{level: tensor[0] for level, tensor in batch.items()}}  # (s*s, D) each

    def __getitems__(self, indices):
        """The items of a batch, read into one (B, s*s, D) tensor per level: a Batch (see `collate`)."""
        names = [self.names[index] for index in indices]  # IndexError past the end, as a list
        indices = [index % len(self.files) for index in indices]
        flipped = self._draw_flips(len(indices))
        home = self.preload_device
        if home is not None and home.type != "cpu":  # a CUDA preload: gathered there
            batch = {}
            for level, twin in zip(self.levels, self._twins):
                batch[level] = self.preloaded[level][torch.as_tensor(indices, device=home)]
                if flipped is not None and flipped.any():
                    rows = torch.from_numpy(np.flatnonzero(flipped)).to(home)
                    batch[level][rows] = self.preloaded[twin][torch.as_tensor(indices, device=home)[rows]]
        else:
            worker = get_worker_info() is not None
            widened = self._row_dtype != self.dtype  # bf16 or fp16 files, normalised in float32
            batch = {level: host_empty((len(indices), *self._shapes[level]), self._row_dtype, worker and not widened)
                     for level in self.levels}
            self._read_rows(indices, flipped, {level: as_numpy(tensor) for level, tensor in batch.items()})
            if self.preloaded is None:
                batch = self._as_items(batch, flipped)
                if worker and widened:  # the float32 batch is the one that travels to the main process
                    batch = {level: tensor.share_memory_() for level, tensor in batch.items()}
        rows = {level: tensor.unbind(0) for level, tensor in batch.items()}  # B views (s*s, D) per level
        items = [{"name": name, **{level: rows[level][row] for level in self.levels}}
                 for row, name in enumerate(names)]
        return Batch(items, {"name": names, **batch})

    def _preload(self, preload, device):
        """Read the levels (and their twins) of every item once into `device` memory, normalised when asked."""
        count = len(self.files)
        if not count:
            self.preloaded, self.source = {}, "preload"
            return
        row_bytes = sum(int(np.prod(self._shapes[source])) * self.dtype.itemsize for source in self.sources)
        needed, free = count * row_bytes, free_memory(device)
        if free is not None and needed > free:
            twins = " and their flip/ twins" if self.flip else ""
            raise MemoryError(f"preload={preload!r} needs {_size_text(needed)} ({count} items, levels "
                              f"{self.levels}{twins}) but {device} has {_size_text(free)} free; preload fewer "
                              f"levels, or preload=None to read the {self.source} each step")
        preloaded = {source: host_empty((count, *self._shapes[source]), self.dtype) if device.type == "cpu" else
                     torch.empty((count, *self._shapes[source]), dtype=self.dtype, device=device)
                     for source in self.sources}
        straight = device.type == "cpu" and self.dtype == self.stored_dtype  # read into the preload itself
        step = max(1, PRELOAD_CHUNK_BYTES // max(row_bytes, 1))  # items per chunk read
        chunks = [(start, min(start + step, count), twin) for twin in ((False, True) if self.flip else (False,))
                  for start in range(0, count, step)]

        def read(chunk):
            start, end, twin = chunk
            sources = self._twins if twin else self.levels
            if straight:
                rows = {level: preloaded[source][start:end] for level, source in zip(self.levels, sources)}
            else:  # a host chunk, copied (normalised, or to the device) below
                rows = {level: torch.empty((end - start, *self._shapes[level]), dtype=self.stored_dtype)
                        for level in self.levels}
            flipped = np.full(end - start, twin) if self.flip else None
            self._read_rows(range(start, end), flipped, {level: as_numpy(tensor) for level, tensor in rows.items()})
            return chunk, self._as_items(rows, flipped)

        def describe(chunk):
            start, end, twin = chunk
            return f"items {start} to {end - 1}{' (flip/ twins)' if twin else ''} of {self.root}"

        workers = min(4, cpus_per_process())  # like the loader's: each rank of the node preloads at once
        for (start, end, twin), rows in read_ahead(read, chunks, workers, 2 * workers, describe=describe):
            if not straight:
                for level, source in zip(self.levels, self._twins if twin else self.levels):
                    preloaded[source][start:end].copy_(rows[level])
        self.preloaded, self.source = preloaded, "preload"


def _row_bytes(array):
    """The bytes of each row of a C-contiguous numpy array or CPU tensor (N, ...), as a uint8 numpy array
    (N, bytes per row): a gather the same for every dtype, those numpy lacks (bfloat16) included."""
    if isinstance(array, torch.Tensor):
        array = array.view(torch.uint8).numpy()
    return array.reshape(len(array), math.prod(array.shape[1:])).view(np.uint8)


def _naming(error, path):
    """`error` where its message names `path`, else an error of its type (RuntimeError where that type
    cannot be made from a message) that does: every error of the reader names its file."""
    if str(path) in str(error):
        return error
    try:
        return type(error)(f"reading {path}: {error}")
    except Exception:  # noqa: BLE001 - an error type with its own constructor
        return RuntimeError(f"reading {path}: {error}")


def _size_text(count):
    """Bytes as people read them: '4.52 GB', '20.1 MB', '512 kB'."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.3g} {unit}" if count < 100 * size else f"{count / size:.0f} {unit}"
    return f"{count} bytes"


def _preload_device(preload):
    """The torch.device of a preload= argument (None: none), refused in one sentence when unusable."""
    if preload is None:
        return None
    try:
        device = torch.device(preload)
    except (RuntimeError, TypeError):
        raise ValueError(f"preload must be None, 'cpu', 'cuda' or a torch.device, not {preload!r}.") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"preload={preload!r}: only CPU and CUDA memory can hold a preload.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"preload={preload!r}: torch sees no CUDA device here; preload='cpu' holds the levels "
                         f"in this machine's memory.")
    return device
