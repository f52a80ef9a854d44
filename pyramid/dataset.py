"""PyramidDataset, the reader for the training phase."""

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate, get_worker_info

from pyramid.pack import (available_levels, current_pack, item_name, level_path, pack_command, pack_dir,
                          tree_digest, tree_state)
from pyramid.reader import read_pyramid

FLIP_CHOICES = (False, "random")


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


def _empty_batch(shape, shared):
    """A float32 tensor for a batch; in shared memory inside a DataLoader worker, as default_collate
    makes its output, so it reaches the main process without another copy.

    Elsewhere numpy allocates it: numpy asks the kernel for huge pages on large arrays, and filling a
    fresh 50 MB batch then costs 7 ms instead of torch.empty's 50 ms of 4 KiB page faults (measured here).
    """
    if not shared:
        return torch.from_numpy(np.empty(shape, dtype=np.float32))
    numel = int(np.prod(shape))
    storage = torch.UntypedStorage._new_shared(numel * 4)
    return torch.empty(0, dtype=torch.float32).set_(storage, 0, shape)


class PyramidDataset(Dataset):
    """The pyramid files below `root`, in sorted order, one item per image.

    Item i is a dict: `"name"` is the image's path relative to `root` without its suffix, as a POSIX
    string (`"a/b/c"` for `a/b/c.pt`, made from `a/b/c.jpg`), and one `float32` tensor of shape
    `[s*s, D]` per level asked for (the stored `[1, s*s, D]` without its leading 1), so the default
    collate gives `{"name": [B names], "8x8": (B, 64, D), ...}`.

    `levels`: a list of level names such as `["4x4", "8x8"]`; None means every plain level. Only the
    levels asked for are read from disk. The available levels are those of manifest.json (with their
    `flip/` twins when it says flip), or of the first file when there is no manifest.

    `normalize=True`: each level becomes `(x - mean) / std` per channel, with the mean and std of the
    level actually read from `root/stats.pt` (`python -m pyramid.stats`); refused when stats.pt is
    missing or was computed from other files.

    `flip="random"`: per item, either the levels or their `flip/` twins (the mirrored image), under the
    plain keys, each with probability 1/2, drawn from torch's random generator: seeded by
    torch.manual_seed in the main process, and per worker and epoch by the DataLoader as usual.

    Reading: `DataLoader(dataset, batch_size=B, collate_fn=PyramidDataset.collate)` reads each batch
    through `__getitems__` straight into one (B, s*s, D) tensor per level (in shared memory inside a
    worker); the default collate_fn gives the same batches after one more copy.

    `pack`: "auto" reads `root/pack/` (`python -m pyramid.pack`) when it is current and holds the
    levels, and the files otherwise; True requires a current pack; False always reads the files. The
    items are the same either way. Which one is used is `self.source`: "pack" or "files".
    """

    def __init__(self, root, levels=None, normalize=False, flip=False, pack="auto"):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root} is not a directory; pass the extractor's --output_dir.")
        if flip not in FLIP_CHOICES:
            raise ValueError(f"flip must be False or 'random', not {flip!r}.")
        if pack not in ("auto", True, False):
            raise ValueError(f"pack must be 'auto', True or False, not {pack!r}.")
        manifest, records = tree_state(self.root)  # one stat per file: what the pack and stats are checked by
        self.files = [entry[0] for entry in records]  # relative POSIX paths, sorted as strings
        self.names = [item_name(relative) for relative in self.files]
        available = available_levels(self.root, manifest, self.files[0] if self.files else None)
        if levels is None:
            levels = [level for level in available if not level.startswith("flip/")]
        elif isinstance(levels, str):
            raise TypeError(f"levels must be a list of level names such as [{levels!r}], not a string.")
        unknown = [level for level in levels if level not in available]
        if unknown and available:
            raise ValueError(f"unknown level(s) {unknown}; available: {available}.")
        self.levels = list(levels)
        self.flip = flip
        if flip and available:
            unflippable = [level for level in self.levels if f"flip/{level}" not in available]
            if unflippable:
                raise ValueError(f"flip='random' needs the flip/ twins of {unflippable}, which these files do "
                                 f"not have; extract with --flip.")
        self.sources = self.levels + ([f"flip/{level}" for level in self.levels] if flip else [])
        self._pack = self._choose_pack(pack, manifest, records)
        self.source = "files" if self._pack is None else "pack"
        self._scales = self._load_scales(manifest, records) if normalize else None
        self._open_pid, self._pack_files = None, None
        self._shapes = self._level_shapes()
        different = [level for level in self.levels if flip and self._shapes[f"flip/{level}"] != self._shapes[level]]
        if different:
            raise ValueError(f"the flip/ twins of {different} have other shapes than the levels")

    collate = staticmethod(collate)

    def _level_shapes(self):
        """{level: (s*s, D)} of every source level, from the pack or the first file (one small read)."""
        if self._pack is not None:
            return {level: tuple(layout[3]) for level, layout in self._pack.items()}
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
        for level in self.sources:
            path = level_path(pack_dir(self.root), level)
            array = np.load(path, mmap_mode="r")  # (N, s*s, D): read only for its header's size
            if array.dtype != np.float32 or array.shape[0] != len(self.files):
                raise ValueError(f"{path} holds {array.dtype} {list(array.shape)}, not float32 [{len(self.files)}, ...]")
            layout[level] = (path, array.offset, array[0].nbytes, array.shape[1:])
        return layout

    def _load_scales(self, manifest, records):
        """{level: (mean (D,), std (D,)) float32} from stats.pt, after checking it was made from these files."""
        from pyramid.stats import STATS_NAME

        path = self.root / STATS_NAME
        if not path.exists():
            raise FileNotFoundError(f"normalize=True needs {path}; run python -m pyramid.stats {self.root}")
        stats = torch.load(path, weights_only=True)
        if stats.get("source", {}).get("digest") != tree_digest(manifest, records):
            raise ValueError(f"{path} was computed from other files than {self.root} holds now "
                             f"({stats.get('count')} files then, {len(records)} now, or some rewritten); "
                             f"rerun python -m pyramid.stats {self.root}")
        missing = [level for level in self.sources if level not in stats]
        if missing:
            raise ValueError(f"{path} has no statistics for {missing}; rerun python -m pyramid.stats {self.root}")
        scales = {}
        for level in self.sources:
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
        state["_open_pid"], state["_pack_files"] = None, None  # file descriptors do not travel to workers
        return state

    def _read_pack(self, index, targets):
        if self._open_pid != os.getpid():  # first read in this process (a DataLoader worker has its own)
            self._pack_files = {level: os.open(path, os.O_RDONLY) for level, (path, *_) in self._pack.items()}
            self._open_pid = os.getpid()
        for level, target in targets.items():
            _, offset, row_bytes, _ = self._pack[level]
            # One pread per row straight into the batch: the rate of a plain read of the same bytes.
            if os.preadv(self._pack_files[level], [memoryview(target.numpy()).cast("B")],
                         offset + index * row_bytes) != row_bytes:
                raise OSError(f"{level_path(pack_dir(self.root), level)} is shorter than its header says")

    def _read_file(self, index, targets):
        path = self.root / self.files[index]
        pyramid, keys = read_pyramid(path, list(targets), out=targets)
        missing = [source for source in targets if source not in pyramid]
        if missing:
            raise KeyError(f"{path} has no level {missing[0]!r}; it has {keys}.")

    def _fill(self, index, targets):
        """Read item `index` into targets {source level: (s*s, D) tensor}, normalised when asked."""
        if self._pack is not None:
            self._read_pack(index, targets)
        else:
            self._read_file(index, targets)
        if self._scales is not None:
            for source, target in targets.items():
                high, low, std = self._scales[source]
                target.sub_(high).sub_(low).div_(std)  # (s*s, D), per channel

    def _sources_for_item(self):
        """The levels one item is read from: the plain ones, or (flip="random", half the time) their twins."""
        if self.flip == "random" and torch.randint(2, ()).item():
            return [f"flip/{level}" for level in self.levels]
        return self.levels

    def __getitem__(self, index):
        item = {"name": self.names[index]}  # IndexError past the end, as a list
        targets = {}
        for level, source in zip(self.levels, self._sources_for_item()):
            targets[source] = item[level] = torch.empty(self._shapes[level], dtype=torch.float32)  # (s*s, D)
        self._fill(index % len(self.files), targets)
        return item

    def __getitems__(self, indices):
        """The items of a batch, read into one (B, s*s, D) tensor per level: a Batch (see `collate`)."""
        names = [self.names[index] for index in indices]  # IndexError past the end, as a list
        shared = get_worker_info() is not None
        batch = {level: _empty_batch((len(indices), *self._shapes[level]), shared) for level in self.levels}
        rows = {level: tensor.unbind(0) for level, tensor in batch.items()}  # B views (s*s, D) per level
        items = []
        for row, (index, name) in enumerate(zip(indices, names)):
            item = {"name": name}
            targets = {}
            for level, source in zip(self.levels, self._sources_for_item()):
                targets[source] = item[level] = rows[level][row]
            self._fill(index % len(self.files), targets)
            items.append(item)
        return Batch(items, {"name": names, **batch})
