"""The reader figures of pyramid.bench: how fast the training phase reads an output tree, side by side.

    python -m pyramid.bench --reader --synthetic_tree 2000      # base-size pyramids it makes (D=768)
    python -m pyramid.bench --reader --tree data/feature_pyramids

Rows, each over the same number of items, in one process unless it says DataLoader: the raw read()
bound of the files, the same read() into the rows of batch-sized buffers (the cost of one copy into
memory larger than the caches, which every batch is), torch.load, the plain dataset (torch.load with
mmap, then a clone per level), PyramidDataset items from the files, the raw pread() bound of the pack
rows an item is made of, PyramidDataset items from the pack; the DataLoader loops
(collate_fn=PyramidDataset.collate, timed on their second epoch with persistent workers; the plain
dataset's with the default collate); the plain loop (DataLoader(dataset, batch_size, shuffle=True,
num_workers), default collate, workers started each epoch); and dataset.loader(batch_size,
shuffle=True) from the files, the pack and a CPU preload, each pass a new epoch, timed until it has
served the items.
Rounds are interleaved (each round runs every row once, in a rotated order) and the median is
reported, so a machine that is busy in bursts slows every row alike.
"""

import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pyramid import exits
from pyramid.cli import default_threads
from pyramid.dataset import PyramidDataset
from pyramid.exits import UsageError
from pyramid.loader import PREFETCH, default_workers
from pyramid.pack import build_pack
from pyramid.synthetic import numbered_names, write_tree
from pyramid.tree import available_levels, current_pack, item_name, pack_dir, pack_level_path, tree_state


class MmapCloneDataset(torch.utils.data.Dataset):
    """The plain way to read pyramid files: torch.load with mmap, then a clone per level."""

    def __init__(self, root, files, levels):
        self.root, self.files, self.levels = Path(root), files, levels

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        pyramid = torch.load(self.root / self.files[index], weights_only=True, mmap=True)
        item = {"name": item_name(self.files[index])}
        for level in self.levels:
            item[level] = pyramid[level][0].clone()  # (s*s, D)
        return item


def _per_item(function, order):
    started = time.perf_counter()
    for index in order:
        function(index)
    return len(order) / (time.perf_counter() - started)


def _through_loader(dataset, batch_size, num_workers, seed, collate_fn=None):
    """Items/s of the second epoch of a DataLoader with persistent workers: training's steady state,
    without the start of the workers."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed), collate_fn=collate_fn,
                                         persistent_workers=num_workers > 0)
    for _ in loader:
        pass
    started = time.perf_counter()
    count = sum(len(batch["name"]) for batch in loader)
    return count / (time.perf_counter() - started)


def _plain_loop(dataset, batch_size, num_workers, seed):
    """Items/s of one epoch of the plain DataLoader loop: shuffled, the default collate, workers started
    for the epoch."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers,
                                         generator=torch.Generator().manual_seed(seed))
    started = time.perf_counter()
    count = sum(len(batch["name"]) for batch in loader)
    return count / (time.perf_counter() - started)


def _through_pyramid_loader(loader, items):
    """Items/s of the next epoch of a dataset.loader(), until it has served `items` items."""
    started, count = time.perf_counter(), 0
    for batch in loader:
        count += len(batch["name"])
        if count >= items:
            break
    return count / (time.perf_counter() - started)


def reader_rows(root, items, rounds, batch_size, num_workers):
    """({row: (items/s, bytes per item)}, seconds the CPU preload took): medians over interleaved rounds
    (see the module docstring)."""
    files_dataset = PyramidDataset(root, pack=False)
    pack_dataset = PyramidDataset(root, pack=True)
    started = time.perf_counter()
    preload_dataset = PyramidDataset(root, preload="cpu")
    preload_seconds = time.perf_counter() - started
    levels, files = files_dataset.levels, files_dataset.files
    paths = [os.path.join(root, relative) for relative in files]
    order = np.random.default_rng(0).permutation(len(files))[:items].tolist()
    file_bytes = int(np.mean([os.path.getsize(paths[i]) for i in order]))
    layout = pack_dataset._pack  # {level: (path, offset of row 0, bytes per row, shape)}
    pack_fds = {level: os.open(pack_level_path(pack_dir(root), level), os.O_RDONLY) for level in levels}
    row_bytes = sum(layout[level][2] for level in levels)
    plain = MmapCloneDataset(root, files, levels)
    subset = torch.utils.data.Subset

    def read_file(index):
        with open(paths[index], "rb", buffering=0) as file:
            file.read()

    # The same read() into the rows of batch-sized buffers, used in turn as the loader uses its own: what one
    # copy of the bytes into memory far larger than the caches costs, where read() above reuses one hot buffer.
    batch_rows = [np.empty((batch_size, max(os.path.getsize(paths[i]) for i in order)), np.uint8)
                  for _ in range(PREFETCH + 3)]
    for rows_of_a_batch in batch_rows:
        rows_of_a_batch.fill(0)  # its pages in place before it is timed, as the loader's are after its first batch

    def read_into_batch_rows():
        started = time.perf_counter()
        for position, index in enumerate(order):
            with open(paths[index], "rb", buffering=0) as file:
                file.readinto(batch_rows[position // batch_size % len(batch_rows)][position % batch_size])
        return len(order) / (time.perf_counter() - started)

    def read_pack_rows(index):
        for level in levels:
            _, offset, size, _ = layout[level]
            os.pread(pack_fds[level], size, offset + index * size)

    rows = {
        "raw read(), files": (lambda: _per_item(read_file, order), file_bytes),
        "raw read() into batch rows, files": (read_into_batch_rows, file_bytes),
        "torch.load, files": (lambda: _per_item(lambda i: torch.load(paths[i], weights_only=True), order), file_bytes),
        "torch.load mmap + clone, files": (lambda: _per_item(plain.__getitem__, order), file_bytes),
        "PyramidDataset, files": (lambda: _per_item(files_dataset.__getitem__, order), file_bytes),
        "raw pread(), pack rows": (lambda: _per_item(read_pack_rows, order), row_bytes),
        "PyramidDataset, pack": (lambda: _per_item(pack_dataset.__getitem__, order), row_bytes),
    }
    for workers in sorted({0, num_workers}):
        for name, dataset, size, collate_fn in (("mmap + clone", plain, file_bytes, None),
                                                ("files", files_dataset, file_bytes, PyramidDataset.collate),
                                                ("pack", pack_dataset, row_bytes, PyramidDataset.collate)):
            rows[f"DataLoader(batch {batch_size}, {workers} workers), {name}"] = (
                lambda dataset=dataset, collate_fn=collate_fn, workers=workers: _through_loader(
                    subset(dataset, order), batch_size, workers, 0, collate_fn), size)
    for name, dataset in (("files", files_dataset), ("pack", pack_dataset)):
        rows[f"plain loop: DataLoader(batch {batch_size}, shuffle, {num_workers} workers), {name}"] = (
            lambda dataset=dataset: _plain_loop(subset(dataset, order), batch_size, num_workers, 0),
            file_bytes if name == "files" else row_bytes)
    for name, dataset, size in (("files", files_dataset, file_bytes), ("pack", pack_dataset, row_bytes),
                                ("preload cpu", preload_dataset, row_bytes)):
        loader = dataset.loader(batch_size, shuffle=True)
        rows[f"dataset.loader({batch_size}, shuffle=True), {name}"] = (
            lambda loader=loader: _through_pyramid_loader(loader, len(order)), size)
    for function, _ in rows.values():  # warm-up: every byte in the page cache, every code path loaded
        function()
    rates = {name: [] for name in rows}
    names = list(rows)
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            rates[name].append(rows[name][0]())
    for fd in pack_fds.values():
        os.close(fd)
    return {name: (statistics.median(rates[name]), rows[name][1]) for name in names}, preload_seconds


def format_reader_table(figures):
    header = (f"{figures['items']} items of {figures['files']} files ({figures['file_mb']:.2f} MB each, levels "
              f"{figures['levels']}), median of {figures['rounds']} interleaved rounds; pack built in "
              f"{figures['pack_seconds']:.1f} s, {figures['pack_gb']:.2f} GB; CPU preload in "
              f"{figures['preload_seconds']:.1f} s; dataset.loader reads each batch on {figures['loader_workers']} "
              f"threads; load average {figures['load_average']}")
    rows = figures["rows"]
    raw = rows["raw read(), files"][0]
    width = max(len(name) for name in rows) + 2
    lines = [header, f"  {'reader':<{width}}{'items/s':>10}{'GB/s':>8}{'of raw':>8}"]
    for name, (rate, size) in rows.items():
        lines.append(f"  {name:<{width}}{rate:>10.0f}{rate * size / 1e9:>8.2f}{rate / raw:>7.2f}x")
    lines.append(f"  PyramidDataset files / mmap + clone: "
                 f"{rows['PyramidDataset, files'][0] / rows['torch.load mmap + clone, files'][0]:.2f}x; "
                 f"pack / raw pread of its rows: "
                 f"{rows['PyramidDataset, pack'][0] / rows['raw pread(), pack rows'][0]:.2f}; "
                 f"files / raw read of the files: {rows['PyramidDataset, files'][0] / raw:.2f}")
    loader = {name.rsplit(", ", 1)[1]: rate for name, (rate, _) in rows.items() if name.startswith("dataset.loader(")}
    plain = {name.rsplit(", ", 1)[1]: rate for name, (rate, _) in rows.items() if name.startswith("plain loop")}
    lines.append("  dataset.loader / raw read of the files: "
                 + ", ".join(f"{name} {rate / raw:.2f}" for name, rate in loader.items())
                 + f"; files / raw read into batch rows: "
                   f"{loader['files'] / rows['raw read() into batch rows, files'][0]:.2f}"
                 + f"; pack / raw pread of its rows: {loader['pack'] / rows['raw pread(), pack rows'][0]:.2f}"
                 + "; plain loop: " + ", ".join(f"{name} {rate / raw:.2f}" for name, rate in plain.items()))
    return "\n".join(lines)


def reader_main(args):
    """Entry of `python -m pyramid.bench --reader`: the table (or JSON) of reader_rows."""
    if (args.tree is None) == (args.synthetic_tree is None):
        raise UsageError("--reader needs --tree DIR or --synthetic_tree N")
    if args.tree is not None and not args.tree.is_dir():
        raise UsageError(f"--tree {args.tree} is not a directory")
    torch.set_num_threads(1)
    scratch = None
    try:
        if args.tree is None:
            scratch = Path(tempfile.mkdtemp(prefix="pyramid-readbench-"))
            root = write_tree(scratch / "tree", numbered_names(args.synthetic_tree), hidden=768)
        else:
            root = args.tree
        manifest, records = tree_state(root)
        if not records:
            raise UsageError(f"no .pt files under {root}")
        levels = available_levels(root, manifest, records[0][0])
        started = time.perf_counter()
        if current_pack(root, manifest, records, levels)[0] is None:
            build_pack(root, levels, workers=default_threads())
        pack_seconds = time.perf_counter() - started
        pack_gb = sum(path.stat().st_size for path in pack_dir(root).rglob("*.npy")) / 1e9
        num_workers = 2 if args.num_workers is None else args.num_workers
        batch_size = args.batch_size or 64
        rows, preload_seconds = reader_rows(root, min(args.reader_items, len(records)), args.rounds, batch_size,
                                            num_workers)
        figures = {"files": len(records), "items": min(args.reader_items, len(records)), "rounds": args.rounds,
                   "file_mb": np.mean([entry[1] for entry in records]) / 1e6, "levels": len(levels),
                   "pack_seconds": pack_seconds, "pack_gb": pack_gb, "preload_seconds": preload_seconds,
                   "loader_workers": default_workers(),
                   "load_average": " ".join(f"{load:.1f}" for load in os.getloadavg()), "rows": rows}
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(figures, indent=2) if args.json else format_reader_table(figures))
    return exits.OK
