"""Exact dataset statistics for normalising: per level, per channel and per position, in float64 (stats.pt).

    python -m pyramid.stats data/feature_pyramids        # -> data/feature_pyramids/stats.pt

stats.pt: {"count": N, "<level>": {"mean": (D,), "std": (D,), "position_mean": (s*s, D),
"position_std": (s*s, D)}, ..., "source": {"digest": ...}}, float64, population std, for every level
the files hold (flip/ levels included). "source" identifies the files and manifest it was computed
from, so PyramidDataset(normalize=True) can refuse stats that no longer describe the tree.

Exact and deterministic. Every stored value (float32, or bf16/fp16 from --store_dtype: each widens to float32
exactly, then to float64) is widened to float64 (exact) and shifted by the first
file's value at the same position and channel, so the sums are of values of the order of the spread,
not of the mean (no cancellation in sum-of-squares minus square-of-sum). The files are summed in
sorted-name order in blocks of BLOCK files: within a block numpy adds the files one after another per
element, and the blocks are added in order. The blocks are fixed by the file count alone, and reading
threads only fetch, so the result is the same bits whatever the worker count, whether the files or
the pack are read, and in whatever order the files were written. The relative rounding error of a
float64 sum of N terms is below N * 2**-53 (1e-11 for a million files), far below float32's 6e-8.
Per channel, the mean over positions and images is the mean of the position means (every position
has N values), and the variance follows by the law of total variance: mean of the position
variances plus the variance of the position means.
"""

import sys
import time
from pathlib import Path

from pyramid import exits
from pyramid.cli import check_output_tree_args, output_tree_parser, refusals_exit_2
from pyramid.exits import DamagedFile, UsageError
from pyramid.progress import Progress, format_duration
from pyramid.tree import (
    STATS_NAME,
    available_levels,
    current_pack,
    pack_stored_dtype,
    stats_source,
    tree_state,
)
from pyramid.validate import pack_arrays
from pyramid.writer import save_atomic

BLOCK = 64  # files summed per block: fixed, so the sums never depend on the worker count


class LevelSums:
    """Shifted float64 sums of one level over the files, added block by block."""

    def __init__(self, first):
        import numpy as np

        self.shift = first.astype(np.float64)  # (s*s, D): the first file's values
        self.sum = np.zeros_like(self.shift)  # (s*s, D)
        self.squares = np.zeros_like(self.shift)  # (s*s, D)
        self.count = 0

    def add(self, block):
        """block: (B, s*s, D) float32 (the stored values, widened exactly), the next B files in sorted order."""
        import numpy as np

        shifted = block.astype(np.float64) - self.shift  # (B, s*s, D)
        self.sum += shifted.sum(axis=0)
        self.squares += np.square(shifted, out=shifted).sum(axis=0)
        self.count += block.shape[0]

    def result(self):
        import numpy as np
        import torch

        count = self.count
        position_mean = self.shift + self.sum / count  # (s*s, D)
        position_var = np.maximum(self.squares / count - np.square(self.sum / count), 0.0)  # (s*s, D)
        mean = position_mean.mean(axis=0)  # (D,)
        var = position_var.mean(axis=0) + np.square(position_mean - mean).mean(axis=0)  # (D,)
        return {"mean": torch.from_numpy(mean), "std": torch.from_numpy(np.sqrt(var)),
                "position_mean": torch.from_numpy(position_mean),
                "position_std": torch.from_numpy(np.sqrt(position_var))}


def _widened(array, dtype):
    """A pack's block of stored values as float32, exactly: fp16 widens exactly, and a bf16 value's raw bits
    (the pack's uint16) are the upper half of the float32 of the same value."""
    import numpy as np

    if dtype == "bf16":
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(np.float32, copy=False)


def _blocks_from_pack(root, record, manifest, levels):
    """({level: (B, s*s, D) float32}) blocks of BLOCK files from a current pack, in order: as many as its arrays
    hold, each checked against pack.json and the manifest (pack_arrays) before a row is read."""
    import numpy as np

    arrays = {level: np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="C")
              for level, (path, offset, shape, dtype) in pack_arrays(root, record, manifest, levels).items()}
    dtype = pack_stored_dtype(record)
    rows = min(array.shape[0] for array in arrays.values())  # the count, which each array's size was checked by
    for start in range(0, rows, BLOCK):
        yield {level: _widened(np.ascontiguousarray(array[start:start + BLOCK]), dtype)
               for level, array in arrays.items()}


def _blocks_from_files(root, names, levels, workers, manifest):
    """The same blocks as _blocks_from_pack, read from the files on `workers` threads."""
    import numpy as np

    from pyramid.readahead import read_ahead
    from pyramid.reader import expected_from, read_pyramid

    expect = expected_from(manifest)

    def read(name):
        pyramid, keys = read_pyramid(Path(root) / name, levels, expect=expect)
        missing = [level for level in levels if level not in pyramid]
        if missing:
            raise DamagedFile(Path(root) / name, f"has no level(s) {missing}; it has {keys}")
        return {level: tensor[0].float().numpy() for level, tensor in pyramid.items()}  # (s*s, D) each, exact

    block = []
    for pyramid in read_ahead(read, names, workers, 4 * workers):
        block.append(pyramid)
        if len(block) == BLOCK:
            yield {level: np.stack([p[level] for p in block]) for level in levels}
            block = []
    if block:
        yield {level: np.stack([p[level] for p in block]) for level in levels}


def compute_stats(root, workers=4, progress=None, use_pack=True):
    """The stats.pt dict of the tree at `root` (see the module docstring); from its pack when current."""
    manifest, records = tree_state(root)
    if not records:
        raise ValueError(f"no .pt files under {root}")
    names = [entry[0] for entry in records]
    levels = available_levels(root, manifest, names[0])
    record = current_pack(root, manifest, records, levels)[0] if use_pack else None
    blocks = (_blocks_from_pack(root, record, manifest, levels) if record is not None
              else _blocks_from_files(root, names, levels, workers, manifest))
    sums, done = None, 0
    for block in blocks:
        if sums is None:
            sums = {level: LevelSums(block[level][0]) for level in levels}
        for level in levels:
            sums[level].add(block[level])
        done += next(iter(block.values())).shape[0]
        if progress is not None:
            progress.update(done)
    stats = {"count": len(names)}
    stats.update({level: sums[level].result() for level in levels})
    stats["source"] = stats_source(manifest, records, read_from="pack" if record else "files")
    return stats


def get_args_parser():
    return output_tree_parser("pyramid.stats", __doc__, "the extractor's --output_dir; writes OUTPUT_DIR/stats.pt",
                              "threads that read files (the result does not depend on it)")


@refusals_exit_2
def main(args):
    check_output_tree_args(args)
    import torch

    torch.set_num_threads(1)
    # Up front, so a malformed manifest.json or a FIFO among the files is refused (exit 2) before any work.
    manifest, records = tree_state(args.output_dir)
    if not records:
        raise UsageError(f"no .pt files under {args.output_dir}; run the extractor first")
    available_levels(args.output_dir, manifest, records[0][0])
    started = time.monotonic()
    progress = Progress(len(records), desc="files")
    try:
        stats = compute_stats(args.output_dir, args.workers, progress)
    except (ValueError, FileNotFoundError) as error:  # a file met on the way cannot be used (or is gone): named
        progress.close()
        print(f"error: {error}; no stats written (python -m pyramid.verify {args.output_dir} lists every problem)",
              file=sys.stderr)
        return exits.DAMAGED_INPUT
    progress.close()
    path = args.output_dir / STATS_NAME
    try:
        save_atomic(stats, path)
    except OSError as error:
        print(f"error: cannot write {path}: {error.strerror or error}", file=sys.stderr)
        return exits.WRITE_ERROR
    seconds = time.monotonic() - started
    levels = [key for key in stats if key not in ("count", "source")]
    print(f"wrote {path}: {stats['count']} files, levels {levels}, read from the {stats['source']['read_from']} "
          f"in {format_duration(seconds)} ({stats['count'] / max(seconds, 1e-9):.0f} files/s)")
    return exits.OK


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
