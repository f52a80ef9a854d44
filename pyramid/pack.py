"""A packed copy of an output tree for fast training reads: per level one contiguous [N, s*s, D] array.

    python -m pyramid.pack data/feature_pyramids                 # every level, into data/feature_pyramids/pack/
    python -m pyramid.pack data/feature_pyramids --levels 4x4 1x1

pack/ holds `<level>.npy` per level (`flip/<level>.npy` for flip levels), [N, s*s, D] in the files' stored
dtype (--store_dtype: float32, float16, or bfloat16 as uint16 holding its raw bits, since numpy has no
bfloat16) in the sorted-name order of the files, memory-mappable with numpy.load(mmap_mode="r"), and
pack.json: the names, the dtype ("fp32", "bf16", "fp16"), per file what identifies its version cheaply
(size, mtime_ns), and the manifest. PyramidDataset serves a bf16 pack back as torch.bfloat16, bit for bit.
A pack is current while the tree's .pt files and manifest are still exactly those: one os.stat per
file at open time, no file read. A file added, removed or rewritten (the extractor writes a new file
and renames it into place, so its mtime is the time of that write) or another manifest makes it
stale, and a stale pack is never served: PyramidDataset reads the files, and the next pack rebuilds it.

The pack is built in a hidden temporary directory beside it and renamed into place once complete,
so a killed pack leaves the previous pack (or none), never a partial one that looks complete.
"""

import json
import os
import shutil
import sys
import time
from pathlib import Path

from pyramid import exits
from pyramid.cli import check_output_tree_args, output_tree_parser, refusals_exit_2
from pyramid.exits import DamagedFile, UsageError
from pyramid.progress import Progress, format_duration
from pyramid.tree import (
    PACK_FORMAT,
    PACK_OLD_PREFIX,
    PACK_RECORD_NAME,
    PACK_TEMPORARY_PREFIX,
    available_levels,
    is_abandoned_temporary,
    item_name,
    pack_dir,
    pack_level_path,
    pack_staleness,
    read_pack_record,
    stored_dtype,
    tree_state,
    writer_tag,
)
from pyramid.validate import pack_arrays


def build_pack(root, levels, workers=4, progress=None):
    """Write a new pack of `levels` for the tree at `root` and rename it into place. Returns its record.

    Raises DamagedFile (a ValueError) naming the file when a file cannot be read, lacks a level or has another
    shape; ValueError for a level that is not a level name, before anything is written.
    """
    import numpy as np

    from pyramid.readahead import read_ahead
    from pyramid.reader import STORED_DTYPES, as_numpy, expected_from, numpy_dtype, read_pyramid

    root = Path(root)
    started = time.monotonic()
    manifest, records = tree_state(root)  # stat before read: a file rewritten meanwhile makes the pack stale
    names = [entry[0] for entry in records]
    if not names:
        raise ValueError(f"no .pt files under {root}")
    temporary = root / f"{PACK_TEMPORARY_PREFIX}{writer_tag()}"
    paths = {level: pack_level_path(temporary, level) for level in levels}  # a key that is no level name: refused
    expect = expected_from(manifest)
    if expect is not None:  # the shapes and dtype from the manifest, which every file is checked against
        shapes = {level: (len(names), *expect.tensors[level][1][1:]) for level in levels}  # (N, s*s, D)
        dtype_name = stored_dtype(manifest)
    else:  # the first file's
        first, _ = read_pyramid(root / names[0], levels)
        missing = [level for level in levels if level not in first]
        if missing:
            raise DamagedFile(root / names[0], f"has no level(s) {missing}")
        shapes = {level: (len(names), *first[level].shape[1:]) for level in levels}  # (N, s*s, D)
        dtype_name = next((name for name, dtype in STORED_DTYPES.items() if dtype == first[levels[0]].dtype), None)
        if dtype_name is None:
            raise DamagedFile(root / names[0], f"{levels[0]} is {first[levels[0]].dtype}, not one of the dtypes "
                                               f"the extractor stores ({', '.join(STORED_DTYPES)})")
    dtype = STORED_DTYPES[dtype_name]
    temporary.mkdir()
    try:
        arrays = {}
        for level, path in paths.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            arrays[level] = np.lib.format.open_memmap(path, mode="w+", dtype=numpy_dtype(dtype), shape=shapes[level])

        def read(name):
            return name, read_pyramid(root / name, levels, expect=expect)[0]

        for index, (name, pyramid) in enumerate(read_ahead(read, names, workers, 4 * workers)):
            for level in levels:
                tensor = pyramid.get(level)
                if tensor is None or tuple(tensor.shape) != (1, *shapes[level][1:]) or tensor.dtype != dtype:
                    got = "no such level" if tensor is None else f"{tensor.dtype} {list(tensor.shape)}"
                    raise DamagedFile(root / name, f"{level} is {got}, expected {dtype} {[1, *shapes[level][1:]]}")
                arrays[level][index] = as_numpy(tensor[0])
            if progress is not None:
                progress.update(index + 1)
        for array in arrays.values():
            array.flush()
        del arrays
        record = {"format": PACK_FORMAT, "count": len(names), "levels": list(levels), "dtype": dtype_name,
                  "shapes": {level: list(shape) for level, shape in shapes.items()},
                  "names": [item_name(name) for name in names], "files": records, "manifest": manifest,
                  "seconds": round(time.monotonic() - started, 3)}
        (temporary / PACK_RECORD_NAME).write_text(json.dumps(record) + "\n")
        _swap_into_place(root, temporary)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return record


def _swap_into_place(root, temporary):
    """Replace pack/ by the complete `temporary`: old pack aside, new one in, old one deleted. Between
    the two renames there is no pack (readers then use the files), never a mixed one."""
    final = pack_dir(root)
    old = root / f"{PACK_OLD_PREFIX}{writer_tag()}"
    if final.exists():
        os.rename(final, old)
    os.rename(temporary, final)
    shutil.rmtree(old, ignore_errors=True)


def remove_abandoned_packs(root):
    """Delete the temporary pack directories of pack runs that are gone (killed)."""
    for entry in Path(root).iterdir():
        if entry.name.startswith((PACK_TEMPORARY_PREFIX, PACK_OLD_PREFIX)) and entry.is_dir() \
                and is_abandoned_temporary(entry):
            shutil.rmtree(entry, ignore_errors=True)


def get_args_parser():
    parser = output_tree_parser("pyramid.pack", __doc__, "the extractor's --output_dir; the pack goes to "
                                "OUTPUT_DIR/pack/", "threads that read files")
    parser.add_argument("--levels", nargs="+", default=None, metavar="LEVEL",
                        help="pack only these levels, e.g. --levels 4x4 1x1 (16x16 is 3/4 of the bytes) "
                             "[every level, flip/ levels included]")
    return parser


@refusals_exit_2
def main(args):
    check_output_tree_args(args)
    import torch

    torch.set_num_threads(1)  # the files are the parallelism
    root = args.output_dir
    remove_abandoned_packs(root)
    manifest, records = tree_state(root)
    if not records:
        raise UsageError(f"no .pt files under {root}; run the extractor first")
    available = available_levels(root, manifest, records[0][0])
    levels = available if args.levels is None else args.levels
    unknown = [level for level in levels if level not in available]
    if unknown:
        raise UsageError(f"unknown level(s) {unknown}; available: {available}")
    try:
        record = read_pack_record(root, len(records))
    except DamagedFile as error:  # what pack is for: rebuilt
        print(f"rebuilding {pack_dir(root)}: {error}", file=sys.stderr)
        record = None
    if record is not None:
        reasons = pack_staleness(record, manifest, records)
        if not reasons:
            try:
                pack_arrays(root, record, manifest, record["levels"])
            except DamagedFile as error:
                reasons = [str(error)]
        if not reasons and record["levels"] == levels:
            print(f"{pack_dir(root)} is current ({record['count']} files, levels {levels}); nothing to do")
            return exits.OK
        print(f"rebuilding {pack_dir(root)}: " + "; ".join(reasons or [f"levels {record['levels']} -> {levels}"]),
              file=sys.stderr)
    progress = Progress(len(records), desc="files")
    started = time.monotonic()
    try:
        record = build_pack(root, levels, args.workers, progress)
    except (ValueError, FileNotFoundError) as error:  # a file met on the way cannot be used (or is gone): named
        progress.close()
        print(f"error: {error}; nothing packed (python -m pyramid.verify {root} lists every problem)",
              file=sys.stderr)
        return exits.DAMAGED_INPUT
    except OSError as error:
        progress.close()
        print(f"error: cannot write the pack in {root}: {error}; nothing packed", file=sys.stderr)
        return exits.WRITE_ERROR
    progress.close()
    seconds = time.monotonic() - started
    size = sum(path.stat().st_size for path in pack_dir(root).rglob("*.npy"))
    print(f"packed {record['count']} files, levels {levels}: {size / 1e9:.2f} GB in {pack_dir(root)}, "
          f"{format_duration(seconds)} ({record['count'] / max(seconds, 1e-9):.0f} files/s)")
    return exits.OK


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
