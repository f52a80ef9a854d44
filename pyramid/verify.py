"""Check a finished output tree: every file loads, matches manifest.json, is finite and pools consistently,
a pack under it holds the files' values, and (--recompute, recompute.py) a sample of files is what the model
makes."""

import json
import os
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pyramid import exits
from pyramid.cli import LazyModule, check_output_tree_args, output_tree_parser, refusals_exit_2
from pyramid.exits import DamagedFile, UsageError
from pyramid.families import FAMILIES
from pyramid.levels import level_key, level_side, pyramid_sizes
from pyramid.manifest import FORMAT_VERSION
from pyramid.paths import find_images, output_path_for
from pyramid.progress import Progress
from pyramid.recompute import STORE_ROUNDING, Recompute, recompute_sample
from pyramid.tree import (
    FAILURES_NAME,
    FLIP_PREFIX,
    MANIFEST_NAME,
    PACK_RECORD_NAME,
    REPLACING_KEY,
    STORE_DTYPES,
    manifest_resolution,
    model_family,
    pack_command,
    pack_dir,
    pack_level_path,
    pack_staleness,
    pack_stored_dtype,
    read_manifest,
    read_pack_record,
    scan_outputs,
    stored_dtype,
    tree_state,
    with_twins,
)
from pyramid.validate import most_file_bytes, open_regular, pack_arrays

torch = LazyModule("torch")  # loaded by the first check, so --help and bad arguments answer at once

# A coarser level must equal the 2x2 mean of the finer one to within float32 rounding of a 4-term sum:
# |error| <= ATOL + RTOL * mean(|finer block|). Orders of magnitude above rounding, far below a wrong level.
# In a bf16 or fp16 tree, a stored coarser level and the 2x2 mean of the stored finer one are each one rounding
# from the fp32 pair: RTOL + 2u of the block's mean |x|, u the store's unit roundoff (recompute.STORE_ROUNDING).
ATOL, RTOL = 1e-5, 1e-4
PROBLEMS_FOUND = 1  # the exit status when the tree is not as the contract says


def pool_2x2(level, side):
    """The mean of each 2x2 block of a row-major grid: (1, side*side, D) -> (1, (side/2)**2, D)."""
    grid = level.reshape(1, side, side, -1)  # (1, s, s, D)
    pooled = (grid[:, 0::2, 0::2] + grid[:, 0::2, 1::2]
              + grid[:, 1::2, 0::2] + grid[:, 1::2, 1::2]) / 4  # (1, s/2, s/2, D)
    return pooled.reshape(1, (side // 2) ** 2, -1)


def check_pyramid(pyramid, levels, hidden_size, dtype="fp32"):
    """Problems with one loaded pyramid, as sentences; [] when it is as the contract says.

    `levels` are the names it must have, finest first (then the flip/ twins, finest first, where the
    files have them: checked the same way), `hidden_size` is D and `dtype` the stored dtype's name ("fp32",
    "bf16", "fp16"; None: whichever of them the first level holds): each value must be a contiguous tensor
    of that dtype and shape [1, s*s, D] owning only its storage, finite, and each level the 2x2 mean of the
    one before it (to that dtype's rounding).
    """
    if not isinstance(pyramid, dict):
        return [f"holds a {type(pyramid).__name__}, not a dict of tensors"]
    problems = []
    missing = [level for level in levels if level not in pyramid]
    extra = [key for key in pyramid if key not in levels]
    if missing:
        problems.append(f"missing level(s) {missing}")
    if extra:
        problems.append(f"unexpected key(s) {extra}")
    from pyramid.reader import STORED_DTYPES

    good = {}  # the levels fit for the 2x2 check
    if dtype is None:  # no manifest: the file's own dtype, if it is one the extractor stores
        first = next((value for value in pyramid.values() if isinstance(value, torch.Tensor)), None)
        dtype = next((name for name, value in STORED_DTYPES.items() if first is not None and first.dtype == value),
                     "fp32")
    expected_dtype = STORED_DTYPES[dtype]
    for level in levels:
        tensor = pyramid.get(level)
        side = level_side(level.removeprefix(FLIP_PREFIX)) if isinstance(level, str) else None
        if tensor is None or side is None:
            continue
        if not isinstance(tensor, torch.Tensor):
            problems.append(f"{level} is a {type(tensor).__name__}, not a tensor")
            continue
        expected_shape = (1, side * side, hidden_size)
        if tuple(tensor.shape) != expected_shape:
            problems.append(f"{level} has shape {list(tensor.shape)}, expected {list(expected_shape)}")
            continue
        if tensor.dtype != expected_dtype:
            problems.append(f"{level} is {tensor.dtype}, expected {expected_dtype} (store_dtype {dtype})")
            continue
        if not tensor.is_contiguous():
            problems.append(f"{level} is not contiguous")
        if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
            problems.append(f"{level} shares a larger storage ({tensor.untyped_storage().nbytes()} bytes)")
        non_finite = tensor.numel() - int(torch.isfinite(tensor).sum())
        if non_finite:
            problems.append(f"{level} has {non_finite} non-finite value(s)")
            continue
        good[level] = (side, tensor.float())  # exact: the 2x2 means in float32, whatever the stored dtype
    relative = RTOL + 2 * STORE_ROUNDING[dtype]
    for finer, coarser in zip(levels, levels[1:]):
        if finer not in good or coarser not in good or good[finer][0] != 2 * good[coarser][0]:
            continue
        side, fine = good[finer]
        error = (good[coarser][1] - pool_2x2(fine, side)).abs()
        allowed = ATOL + relative * pool_2x2(fine.abs(), side)
        if (error > allowed).any():
            problems.append(f"{coarser} is not the 2x2 mean of {finer} (max error {error.max().item():.3g})")
    return problems


def check_manifest(manifest):
    """Problems with a parsed manifest.json that would make its levels or hidden size untrustworthy."""
    if not isinstance(manifest, dict):
        return ["is not a JSON object"]
    problems = []
    if manifest.get(REPLACING_KEY):
        problems.append("says an --overwrite replacement is unfinished: files of the old settings may remain; "
                        "rerun the extractor with the manifest's settings to finish it")
    if manifest.get("format") != FORMAT_VERSION:
        problems.append(f"format is {manifest.get('format')!r}, this verify knows format {FORMAT_VERSION}")
    hidden_size = manifest.get("hidden_size")
    if not isinstance(hidden_size, int) or hidden_size < 1:
        problems.append(f"hidden_size is {hidden_size!r}, not a positive integer")
    grid_size = manifest.get("grid_size")
    if not isinstance(grid_size, int) or grid_size < 1:
        problems.append(f"grid_size is {grid_size!r}, not a positive integer")
    elif manifest.get("levels") != (levels := [level_key(size) for size in pyramid_sizes(grid_size)]):
        problems.append(f"levels are {manifest.get('levels')!r}, expected {levels} for grid_size {grid_size}")
    if manifest.get("flip", False) not in (True, False):
        problems.append(f"flip is {manifest.get('flip')!r}, not true or false")
    if stored_dtype(manifest) not in STORE_DTYPES:
        problems.append(f"store_dtype is {manifest.get('store_dtype')!r}, not one of {', '.join(STORE_DTYPES)}")
    if model_family(manifest) not in FAMILIES:
        problems.append(f"model_family is {model_family(manifest)!r}, not one of {', '.join(FAMILIES)}")
    resolution, patch_size = manifest_resolution(manifest), manifest.get("patch_size")
    if isinstance(grid_size, int) and isinstance(patch_size, int) and resolution != grid_size * patch_size:
        problems.append(f"resolution is {resolution!r}, but grid_size {grid_size} x patch_size {patch_size} is "
                        f"{grid_size * patch_size}")
    return problems


def manifest_layout(output_dir):
    """(levels, hidden size, problems) from manifest.json; levels and hidden size are None unless it is usable."""
    try:
        manifest = read_manifest(output_dir)
    except DamagedFile as error:
        return None, None, [error.problem]
    if manifest is None:
        return None, None, ["missing; each file is checked against its own levels and the other files instead"]
    problems = check_manifest(manifest)
    if problems:
        return None, None, problems
    return with_twins(manifest["levels"], manifest.get("flip", False)), manifest["hidden_size"], []


def layout_of(pyramid):
    """(levels finest first, hidden size, dtype) that a loaded pyramid claims; used when there is no manifest."""
    if not isinstance(pyramid, dict):
        return [], None, None
    levels = sorted((key for key in pyramid if level_side(key)),
                    key=level_side, reverse=True)
    levels = with_twins(levels, any(isinstance(key, str) and key.startswith(FLIP_PREFIX) for key in pyramid))
    first = pyramid.get(levels[0]) if levels else None
    hidden_size = first.shape[-1] if isinstance(first, torch.Tensor) and first.dim() > 0 else None
    return levels, hidden_size, first.dtype if isinstance(first, torch.Tensor) else None


def load_and_check(path, levels, hidden_size, dtype=None):
    """(problems, layout) for one file; with levels None it is checked against its own layout. `dtype`: the
    manifest's store_dtype (None: the file's own). Only a regular file is loaded (a FIFO would block), and only
    one no larger than the manifest's levels make a file."""
    try:
        fd = open_regular(path)
        size = os.fstat(fd).st_size
        os.close(fd)
    except DamagedFile as error:
        return [error.problem], None
    except OSError as error:
        return [f"cannot be opened ({error.strerror or error})"], None
    too_large = None
    if levels is not None:
        def most(stored):
            return most_file_bytes({level: (stored, (1, level_side(level.removeprefix(FLIP_PREFIX)) ** 2,
                                                     hidden_size)) for level in levels})

        if size > most(dtype or "fp32"):
            too_large = f"is {size} bytes; the levels manifest.json names take at most {most(dtype or 'fp32')}"
            # Larger than these levels in any stored dtype: not loaded. Within fp32's size it is loaded, so
            # a file of another dtype (fp32 in a bf16 tree) is named for its dtype.
            if size > most("fp32"):
                return [too_large], None
    try:
        pyramid = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a torn file can fail inside zipfile, pickle or torch; all mean the same
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return [f"cannot be loaded ({type(error).__name__}: {message})"], None
    layout = layout_of(pyramid)
    if levels is None:
        if not layout[0]:
            return ["holds no '{s}x{s}' levels"], layout
        levels, hidden_size, _ = layout
    problems = check_pyramid(pyramid, levels, hidden_size, dtype)
    return (problems or [too_large]) if too_large else problems, layout


def check_pack(output_dir):
    """(compare, problems) for OUTPUT_DIR/pack: compare(relative path) lists where a file's levels differ
    from its rows in a current pack (None when there is no pack to compare); problems of the pack itself."""
    import numpy as np

    from pyramid.reader import STORED_DTYPES, as_numpy, read_pyramid

    directory = pack_dir(output_dir)
    if not os.path.lexists(directory):
        return None, []
    rerun = f"rerun {pack_command(output_dir)}"
    try:
        manifest, records = tree_state(output_dir)
        record = read_pack_record(output_dir, len(records))
    except DamagedFile as error:  # a FIFO among the files, a broken manifest: named by their own checks
        if os.path.basename(error.path) != PACK_RECORD_NAME:
            return None, []
        return None, [(error.path, f"{error.problem}; {rerun}")]
    if record is None:
        return None, [(directory, f"has no readable {PACK_RECORD_NAME}; {rerun}")]
    reasons = pack_staleness(record, manifest, records)
    if reasons:
        return None, [(directory, f"is stale, so never read ({'; '.join(reasons)}); {rerun}")]
    arrays, problems = {}, []
    dtype = pack_stored_dtype(record)
    if manifest is not None and dtype != stored_dtype(manifest):
        return None, [(directory, f"holds {dtype} arrays ({PACK_RECORD_NAME}), the files are "
                                  f"{stored_dtype(manifest)} ({MANIFEST_NAME}); {rerun}")]
    if dtype not in STORED_DTYPES:
        return None, [(directory, f"says its arrays are {dtype!r} ({PACK_RECORD_NAME}); {rerun}")]
    for level in record["levels"]:
        # Each array as pack.json and the manifest say (dtype, C order, shape, size), as PyramidDataset checks it.
        try:
            (path, offset, shape, numpy_type), = pack_arrays(output_dir, record, manifest, [level]).values()
        except DamagedFile as error:
            problems.append((error.path, error.problem))
            continue
        arrays[level] = np.memmap(path, dtype=numpy_type, mode="r", offset=offset, shape=shape, order="C")
    rows = {entry[0]: index for index, entry in enumerate(record["files"])}

    def compare(relative):
        try:
            pyramid, _ = read_pyramid(Path(output_dir) / relative, list(arrays))
        except DamagedFile as error:  # changed since it was checked
            return [error.problem]
        return [f"{level} differs from its row {rows[relative]} in {pack_level_path(directory, level)}; {rerun}"
                for level, array in arrays.items()
                if level in pyramid and not (pyramid[level].dtype == STORED_DTYPES[dtype]
                                             and np.array_equal(array[rows[relative]], as_numpy(pyramid[level][0])))]

    return compare, problems


def read_failures(output_dir):
    """{relative image path: last recorded error} from failures.jsonl, and problems with its lines."""
    failures, problems = {}, []
    path = Path(output_dir) / FAILURES_NAME
    if not path.is_file():
        return failures, problems
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            failures[entry["path"]] = entry.get("error", "")
        except (ValueError, KeyError, TypeError):
            problems.append(f"line {number} is not a JSON object with a path: {line[:80]!r}")
    return failures, problems


def counted(number, singular, plural=None):
    """'1 problem', '2 problems', '0 leftover temporaries'."""
    return f"{number} {singular if number == 1 else plural or singular + 's'}"


def get_args_parser():
    parser = output_tree_parser("pyramid.verify", __doc__, "the extractor's --output_dir", "threads that load files")
    parser.add_argument("--input_dir", type=Path, default=None,
                        help="the images it was made from: lists images without a file and files without an image")
    parser.add_argument("--recompute", type=int, default=None, metavar="N",
                        help="also re-encode a seeded random sample of N images (all when N is at least their "
                             "number) with the manifest's model and settings, in fp32 on the best device here, and "
                             "name each file that differs beyond its dtype's tolerance (needs --input_dir)")
    parser.add_argument("--seed", type=int, default=0, help="the seed of --recompute's sample")
    parser.add_argument("--model", default=None,
                        help="for --recompute: where the manifest's model is on this machine (a hub id or a "
                             "save_pretrained directory), when not at the manifest's path; same weights only")
    return parser


def check_args(args):
    check_output_tree_args(args)
    if args.input_dir is not None and not args.input_dir.is_dir():
        raise UsageError(f"--input_dir {args.input_dir} is not a directory; pass the extractor's --input_dir")
    if args.recompute is not None:
        if args.input_dir is None:
            raise UsageError("--recompute needs --input_dir, the images the files were made from")
        if args.recompute < 1:
            raise UsageError(f"--recompute must be at least 1, not {args.recompute}")
    elif args.model is not None:
        raise UsageError("--model is for --recompute; add --recompute N")


@refusals_exit_2
def main(args):
    check_args(args)
    output_dir = args.output_dir
    compute_threads = torch.get_num_threads()
    # The files are the parallelism; intra-op threads on ~1 MB tensors only contend with them
    # (measured: with 2 intra-op threads on a loaded 2-core machine, single runs stalled for 8-18 s).
    torch.set_num_threads(1)
    problems = []  # (path, problem)

    levels, hidden_size, manifest_problems = manifest_layout(output_dir)
    problems += [(output_dir / MANIFEST_NAME, problem) for problem in manifest_problems]
    dtype = stored_dtype(read_manifest(output_dir)) if levels is not None else None

    recompute = None
    if args.recompute is not None:  # refused before any file is read: the model, its weights, the manifest
        if manifest_problems:
            reason = manifest_problems[0] if (output_dir / MANIFEST_NAME).exists() else "there is none"
            raise UsageError(f"--recompute needs {output_dir / MANIFEST_NAME}, which names the model and "
                             f"settings that made the files: {reason}")
        recompute = Recompute(read_manifest(output_dir), args.model)

    finished, temporaries = scan_outputs(output_dir)
    files = sorted(finished)
    problems += [(temporary, "leftover temporary file") for temporary in sorted(temporaries)]

    bad_files = set()
    missing = []
    if args.input_dir is not None:
        expected = {output_path_for(image): image for image in find_images(args.input_dir, skip=[output_dir])}
        present = set(files)
        missing = [image for relative, image in expected.items() if relative not in present]
        problems += [(args.input_dir / image, f"no output file {output_dir / output_path_for(image)}")
                     for image in missing]
        orphans = [relative for relative in files if relative not in expected]
        problems += [(output_dir / relative, "no image for this file") for relative in orphans]
        bad_files.update(orphans)

    compare_with_pack, pack_problems = check_pack(output_dir)
    problems += pack_problems

    def check(relative):
        file_problems, layout = load_and_check(output_dir / relative, levels, hidden_size, dtype)
        if compare_with_pack is not None and not file_problems:
            file_problems = compare_with_pack(relative)
        return file_problems, layout

    layouts = {}  # relative path -> (levels, hidden size) the file claims
    with ThreadPoolExecutor(args.workers) as pool:
        results = pool.map(check, files)
        progress = Progress(len(files), desc="files")  # a bar on a terminal, plain lines in a log
        for done, (relative, (file_problems, layout)) in enumerate(zip(files, results), start=1):
            progress.update(done)
            problems += [(output_dir / relative, problem) for problem in file_problems]
            if file_problems:
                bad_files.add(relative)
            if layout is not None and layout[0]:
                layouts[relative] = (tuple(layout[0]), layout[1], layout[2])
        progress.close()
    if levels is None and layouts:
        # Without a manifest, the layout most files share stands in for it.
        (common, _), = Counter(layouts.values()).most_common(1)
        for relative, layout in layouts.items():
            if layout != common:
                mine, theirs = (f" in {layout[2]}", f" in {common[2]}") if layout[2] != common[2] else ("", "")
                problems.append((output_dir / relative, f"has levels {list(layout[0])} and D={layout[1]}{mine}, "
                                                        f"most files have {list(common[0])} and D={common[1]}"
                                                        f"{theirs}"))
                bad_files.add(relative)

    failures, failure_problems = read_failures(output_dir)
    problems += [(output_dir / FAILURES_NAME, problem) for problem in failure_problems]

    report = []
    if recompute is not None:
        with_files = [image for relative, image in expected.items() if relative in finished]
        torch.set_num_threads(compute_threads)
        recompute_problems, differing, report = recompute_sample(recompute, args, with_files, bad_files)
        problems += recompute_problems
        bad_files.update(differing)

    for path, problem in problems:
        print(f"{path}: {problem}")
    if failures:
        print(f"{len(failures)} image(s) recorded as failed in {FAILURES_NAME}:")
        for image, error in failures.items():
            print(f"  {image}: {error}")
    for line in report:
        print(line)
    summary = [f"checked {counted(len(files), 'file')}: {len(files) - len(bad_files)} ok, "
               f"{len(bad_files)} with problems"]
    if args.input_dir is not None:
        summary.append(f"{counted(len(missing), 'image')} without a file")
    summary += [counted(len(temporaries), "leftover temporary", "leftover temporaries"),
                counted(len(failures), "recorded failure"), f"{counted(len(problems), 'problem')} in all"]
    print("; ".join(summary))
    return PROBLEMS_FOUND if problems else exits.OK


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
