"""A packed copy of an output tree for fast training reads: per level one contiguous [N, s*s, D] array.

    python -m pyramid.pack data/feature_pyramids                 # every level, into data/feature_pyramids/pack/
    python -m pyramid.pack data/feature_pyramids --levels 4x4 1x1

pack/ holds `<level>.npy` per level (`flip/<level>.npy` for flip levels), float32 [N, s*s, D] in the
sorted-name order of the files, memory-mappable with numpy.load(mmap_mode="r"), and pack.json: the
names, and per file what identifies its version cheaply (size, mtime_ns), and the manifest.
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
from pyramid.cli import check_output_tree_args, output_tree_parser
from pyramid.exits import UsageError

PACK_DIR = "pack"
RECORD_NAME = "pack.json"
PACK_FORMAT = 1
TEMPORARY_PREFIX = ".pack.tmp."  # + writer tag: a name paths.is_abandoned_temporary understands
OLD_PREFIX = ".pack-old.tmp."


def file_records(root, relative_paths):
    """[[relative path, size, mtime_ns], ...] for the files, in the given order: what tells one version
    of a file from another without reading it. Not the inode: a copy that keeps mtimes (cp -a, rsync -a)
    of the tree with its pack to a training machine keeps the pack current."""
    records = []
    for relative in relative_paths:
        status = os.stat(os.path.join(root, relative))
        records.append([relative, status.st_size, status.st_mtime_ns])
    return records


def tree_state(root):
    """(manifest or None, file records in sorted-name order) of the output tree at `root` now."""
    from pyramid.manifest import read_manifest
    from pyramid.paths import scan_outputs

    finished, _ = scan_outputs(root)
    return read_manifest(root), file_records(root, sorted(finished))


def tree_digest(manifest, records):
    """A short fingerprint of (compared manifest settings, file records): equal exactly when both are."""
    import hashlib

    from pyramid.manifest import UNCOMPARED_KEYS

    settings = None if manifest is None else {key: value for key, value in sorted(manifest.items())
                                              if key not in UNCOMPARED_KEYS}
    return hashlib.sha256(json.dumps([settings, records], sort_keys=True).encode()).hexdigest()


def staleness(record, manifest, records):
    """Why a pack record no longer matches the tree, as sentences; [] when it is current."""
    from pyramid.manifest import manifest_differences

    reasons = []
    if record.get("format") != PACK_FORMAT:
        reasons.append(f"pack format {record.get('format')!r}, this reader knows {PACK_FORMAT}")
    if (record.get("manifest") is None) != (manifest is None) or (
            manifest is not None and manifest_differences(record["manifest"], manifest)):
        reasons.append("manifest.json differs from the one packed")
    packed = {entry[0]: entry[1:] for entry in record.get("files", [])}
    now = {entry[0]: entry[1:] for entry in records}
    added = len(now.keys() - packed.keys())
    removed = len(packed.keys() - now.keys())
    rewritten = sum(1 for name in now.keys() & packed.keys() if now[name] != packed[name])
    for count, what in ((added, "added"), (removed, "removed"), (rewritten, "rewritten")):
        if count:
            reasons.append(f"{count} file(s) {what} since it was packed")
    return reasons


def pack_dir(root):
    return Path(root) / PACK_DIR


def level_path(directory, level):
    """The array of a level in a pack: '8x8' -> pack/8x8.npy, 'flip/8x8' -> pack/flip/8x8.npy."""
    return Path(directory) / f"{level}.npy"


def read_record(root):
    """The pack.json of the pack under `root`, or None where there is no (complete) pack."""
    path = pack_dir(root) / RECORD_NAME
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def current_pack(root, manifest, records, levels):
    """(record, reasons): the pack's record when it is current and holds `levels`, else None and why not."""
    record = read_record(root)
    if record is None:
        return None, ["no pack"]
    reasons = staleness(record, manifest, records)
    missing = [level for level in levels if level not in record.get("levels", [])]
    if missing:
        reasons.append(f"level(s) {missing} not packed")
    return (None if reasons else record), reasons


def pack_command(root, also=()):
    """The command that rebuilds the pack under `root` with the levels it holds, and `also` these: plain
    `python -m pyramid.pack ROOT` when that is every level, else with --levels, so advice to rebuild a pack of
    4x4 and 1x1 does not pack the 16x16 level that is 3/4 of the bytes. `ROOT` is quoted for a shell."""
    import shlex

    from pyramid.manifest import read_manifest

    record = read_record(root) or {}
    wanted = set(record.get("levels", [])) | set(also)
    command = f"python -m pyramid.pack {shlex.quote(str(root))}"
    try:
        available = available_levels(root, read_manifest(root))
    except (OSError, ValueError, KeyError, TypeError):  # an unreadable manifest: name the levels themselves
        available = []
    if not wanted or available and wanted >= set(available):
        return command
    ordered = [level for level in available if level in wanted] + sorted(wanted - set(available))
    return f"{command} --levels {' '.join(ordered)}"


def item_name(relative_path):
    """The item name of a file: 'a/b/c.pt' -> 'a/b/c'."""
    from pyramid.paths import OUTPUT_SUFFIX

    return relative_path.removesuffix(OUTPUT_SUFFIX)


def available_levels(root, manifest, first_file=None):
    """Every level the files hold, finest first: the manifest's, and their flip/ twins when it says flip;
    without a manifest, the first file's keys."""
    if manifest is not None:
        levels = list(manifest["levels"])
        return levels + [f"flip/{level}" for level in levels] if manifest.get("flip") else levels
    if first_file is not None:
        from pyramid.reader import read_pyramid

        _, keys = read_pyramid(Path(root) / first_file, levels=[])
        return keys
    return []


def read_ahead(function, items, workers, window):
    """function(item) for every item, in order, on `workers` threads, at most `window` results ahead."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as pool:
        pending = deque()
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def build_pack(root, levels, workers=4, progress=None):
    """Write a new pack of `levels` for the tree at `root` and rename it into place. Returns its record.

    Raises ValueError naming the file when a file lacks a level or has another shape.
    """
    import numpy as np
    import torch

    from pyramid.paths import writer_tag
    from pyramid.reader import read_pyramid

    root = Path(root)
    started = time.monotonic()
    manifest, records = tree_state(root)  # stat before read: a file rewritten meanwhile makes the pack stale
    names = [entry[0] for entry in records]
    if not names:
        raise ValueError(f"no .pt files under {root}")
    first, _ = read_pyramid(root / names[0], levels)
    missing = [level for level in levels if level not in first]
    if missing:
        raise ValueError(f"{root / names[0]} has no level(s) {missing}")
    shapes = {level: (len(names), *first[level].shape[1:]) for level in levels}  # (N, s*s, D)
    temporary = root / f"{TEMPORARY_PREFIX}{writer_tag()}"
    temporary.mkdir()
    try:
        arrays = {}
        for level in levels:
            path = level_path(temporary, level)
            path.parent.mkdir(parents=True, exist_ok=True)
            arrays[level] = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shapes[level])

        def read(name):
            return name, read_pyramid(root / name, levels)[0]

        for index, (name, pyramid) in enumerate(read_ahead(read, names, workers, 4 * workers)):
            for level in levels:
                tensor = pyramid.get(level)
                if tensor is None or tuple(tensor.shape) != (1, *shapes[level][1:]) \
                        or tensor.dtype != torch.float32:
                    got = "no such level" if tensor is None else f"{tensor.dtype} {list(tensor.shape)}"
                    raise ValueError(f"{root / name}: {level} is {got}, expected float32 {[1, *shapes[level][1:]]}")
                arrays[level][index] = tensor[0].numpy()
            if progress is not None:
                progress.update(index + 1)
        for array in arrays.values():
            array.flush()
        del arrays
        record = {"format": PACK_FORMAT, "count": len(names), "levels": list(levels),
                  "shapes": {level: list(shape) for level, shape in shapes.items()},
                  "names": [item_name(name) for name in names], "files": records, "manifest": manifest,
                  "seconds": round(time.monotonic() - started, 3)}
        (temporary / RECORD_NAME).write_text(json.dumps(record) + "\n")
        _swap_into_place(root, temporary)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return record


def _swap_into_place(root, temporary):
    """Replace pack/ by the complete `temporary`: old pack aside, new one in, old one deleted. Between
    the two renames there is no pack (readers then use the files), never a mixed one."""
    from pyramid.paths import writer_tag

    final = pack_dir(root)
    old = root / f"{OLD_PREFIX}{writer_tag()}"
    if final.exists():
        os.rename(final, old)
    os.rename(temporary, final)
    shutil.rmtree(old, ignore_errors=True)


def remove_abandoned_packs(root):
    """Delete the temporary pack directories of pack runs that are gone (killed)."""
    from pyramid.paths import is_abandoned_temporary

    for entry in Path(root).iterdir():
        if entry.name.startswith((TEMPORARY_PREFIX, OLD_PREFIX)) and entry.is_dir() \
                and is_abandoned_temporary(entry):
            shutil.rmtree(entry, ignore_errors=True)


def get_args_parser():
    parser = output_tree_parser("pyramid.pack", __doc__, "the extractor's --output_dir; the pack goes to "
                                "OUTPUT_DIR/pack/", "threads that read files")
    parser.add_argument("--levels", nargs="+", default=None, metavar="LEVEL",
                        help="pack only these levels, e.g. --levels 4x4 1x1 (16x16 is 3/4 of the bytes) "
                             "[every level, flip/ levels included]")
    return parser


def main(args):
    try:
        check_output_tree_args(args)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return exits.USAGE
    import torch

    from pyramid.progress import Progress, format_duration

    torch.set_num_threads(1)  # the files are the parallelism
    root = args.output_dir
    remove_abandoned_packs(root)
    manifest, records = tree_state(root)
    if not records:
        print(f"error: no .pt files under {root}; run the extractor first", file=sys.stderr)
        return exits.USAGE
    available = available_levels(root, manifest, records[0][0])
    levels = available if args.levels is None else args.levels
    unknown = [level for level in levels if level not in available]
    if unknown:
        print(f"error: unknown level(s) {unknown}; available: {available}", file=sys.stderr)
        return exits.USAGE
    record = read_record(root)
    if record is not None:
        reasons = staleness(record, manifest, records)
        if not reasons and record["levels"] == levels:
            print(f"{pack_dir(root)} is current ({record['count']} files, levels {levels}); nothing to do")
            return exits.OK
        print(f"rebuilding {pack_dir(root)}: " + "; ".join(reasons or [f"levels {record['levels']} -> {levels}"]),
              file=sys.stderr)
    progress = Progress(len(records), desc="files")
    started = time.monotonic()
    try:
        record = build_pack(root, levels, args.workers, progress)
    except ValueError as error:
        progress.close()
        print(f"error: {error}; nothing packed (python -m pyramid.verify {root} lists every problem)",
              file=sys.stderr)
        return 1
    progress.close()
    seconds = time.monotonic() - started
    size = sum(path.stat().st_size for path in pack_dir(root).rglob("*.npy"))
    print(f"packed {record['count']} files, levels {levels}: {size / 1e9:.2f} GB in {pack_dir(root)}, "
          f"{format_duration(seconds)} ({record['count'] / max(seconds, 1e-9):.0f} files/s)")
    return exits.OK


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
