"""The plan of a run, made by the main process before any work: the images left to do, and the sizes for this machine.

The images left: clashes and foreign manifests refused, files a crash cut short done again, the space they
need checked; the sizes: batch size, decode workers, the shared memory they take.
"""

import json
import os
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path

from pyramid.exits import DamagedFile, UsageError
from pyramid.levels import pyramid_sizes
from pyramid.manifest import adopt_output_tree, build_manifest, version_changes
from pyramid.paths import IMAGE_SUFFIXES, find_clashes, find_damaged_outputs, find_images, images_to_do, output_path_for
from pyramid.progress import format_bytes, log
from pyramid.team import cpus_per_process, usable_cpus
from pyramid.tree import FAILURES_NAME, failed_image, read_manifest, remove_abandoned_temporaries, scan_outputs
from pyramid.writer import estimated_file_bytes, write_atomic


@dataclass
class Plan:
    """What the main process decided for the whole team, before anyone writes."""

    todo: list = field(default_factory=list)
    found: int = 0
    skipped: int = 0
    error: str | None = None
    needed_bytes: int = 0  # the estimated size of the files to write, and the free space of their disk
    free_bytes: int = 0
    model_info: object = None  # ModelInfo, read once (the weights digest reads every weight file)
    processor: object = None  # the model's image processor
    version_changes: dict = field(default_factory=dict)  # {package: [old, new]} of the files kept
    new_manifest: bool = False  # this run wrote the directory's first manifest.json


def default_num_workers(device):
    """Decode workers per process: the CPUs this process may use, shared among the node's processes.

    On a GPU one core stays with the main process, which feeds the GPU. On a CPU the workers take
    every core too: they sleep once their prefetched batches wait, so a heavy model gets the cores
    back, and a light one is not starved of decoding.
    """
    per_process = cpus_per_process()
    if _on_gpu(device):
        return max(1, min(16, per_process - 1))
    return per_process


def cpu_processes_warning(processes):
    """One line for several processes on a machine without a GPU (an accelerate config made for GPUs)."""
    return (f"warning: no GPU: {processes} processes share {usable_cpus()} CPU core(s) on this machine; one process "
            f"(python extract_distributed.py, without accelerate launch) is as fast and loads the model once")


def _on_gpu(device):
    """True for a CUDA device: a torch.device, or its name ('cuda', 'cuda:1')."""
    return getattr(device, "type", str(device).split(":")[0]) == "cuda"


def default_batch_size(device):
    return 64 if _on_gpu(device) else 16


# Batches each decode worker keeps ready (the DataLoader's prefetch_factor), and those the main process
# holds besides (the one being pinned, the one being encoded).
PREFETCHED_PER_WORKER = 2
HELD_BY_MAIN = 2


def shared_memory_needed(batch_size, num_workers, crop_size, flip=False, pixel_bytes=1):
    """Bytes of /dev/shm the decode workers fill at most: each batch of crops (B, 3, crop, crop), uint8 (DINOv2)
    or float32 (DINOv3: `pixel_bytes` 4), doubled with --flip, crosses from a worker to the main process
    through shared memory."""
    if num_workers == 0:
        return 0
    batch_bytes = batch_size * 3 * crop_size * crop_size * pixel_bytes * (2 if flip else 1)
    return (num_workers * PREFETCHED_PER_WORKER + HELD_BY_MAIN) * batch_bytes


def shared_memory_warning(batch_size, num_workers, crop_size, flip=False, pixel_bytes=1, shm="/dev/shm"):
    """One line when `shm` has less room than the decode workers need (a container's 64 MB default), else None."""
    needed = shared_memory_needed(batch_size, num_workers, crop_size, flip, pixel_bytes)
    try:
        stats = os.statvfs(shm)
    except OSError:  # no /dev/shm (not Linux): torch shares memory another way
        return None
    free = stats.f_bavail * stats.f_frsize
    if needed <= free:
        return None
    return (f"warning: {shm} has {free / 2**20:.0f} MB free, but {num_workers} decode workers at batch {batch_size} "
            f"hold up to {needed / 2**20:.0f} MB there; workers may die with 'Bus error': give it more (docker run "
            f"--shm-size={_round_up_gb(needed)}g) or pass a smaller --num_workers or --batch_size")


def _round_up_gb(size):
    return max(1, -(-size // 2**30))


def _recorded_path(line):
    """The image path of a failures.jsonl line (tree.failed_image), or None for a blank or torn line."""
    try:
        return failed_image(json.loads(line))
    except ValueError:
        return None


def prune_failures(output_dir, retried):
    """Drop the failures.jsonl lines of images this run tries again (they are recorded again if still
    broken), and any torn line a killed writer left. The lines kept are kept byte for byte; the file is
    replaced atomically, and one that is not a regular file is refused."""
    path = Path(output_dir) / FAILURES_NAME
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISREG(mode):
        raise UsageError(f"{path} is not a regular file (a link, a FIFO or a folder); remove it and rerun")
    kept = [line for line in path.read_text(encoding="utf-8", errors="surrogateescape").splitlines()
            if (recorded := _recorded_path(line)) is not None and recorded not in retried]
    if kept:
        write_atomic([("\n".join(kept) + "\n").encode("utf-8", "surrogateescape")], path)
    else:
        path.unlink()


def plan_run(settings, info, dtype, lock=None, pixels=None):
    """Find the images, refuse clashes and foreign manifests, take the directory's `lock` (an OutputLock),
    and list the work left. `pixels`: the pixel pipeline (decode.pixel_pipeline). Main process only."""
    images = find_images(settings.input_dir, skip=[settings.output_dir])  # an output tree inside it is no input
    if settings.limit:
        images = images[:settings.limit]
    if not images:
        suffixes = " ".join(sorted(IMAGE_SUFFIXES))
        raise UsageError(f"no images ({suffixes}, any letter case) under {settings.input_dir}")
    clashes = find_clashes(images)
    if clashes:
        named = "; ".join(" and ".join(group) + f" -> {output_path_for(group[0])}" for group in clashes)
        raise UsageError(f"these images would write the same file: {named}; rename or remove one of each")

    output_dir = Path(settings.output_dir)
    needed, free = check_free_space(settings, info, images, output_dir)  # before anything is written
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"cannot create --output_dir {output_dir}: {error.strerror}") from error
    if not os.access(output_dir, os.W_OK | os.X_OK):
        raise UsageError(f"--output_dir {output_dir} is not writable")
    if lock is not None:
        lock.acquire()
        if lock.taken_over:
            log(lock.taken_over)

    manifest = build_manifest(info, dtype, flip=settings.flip, pixels=pixels, store_dtype=settings.store_dtype)
    finished, temporaries = scan_outputs(output_dir)
    try:
        previous = read_manifest(output_dir)
    except DamagedFile:  # adopt_output_tree refuses it, or replaces it with --overwrite
        previous = None
    finished = adopt_output_tree(output_dir, manifest, finished, settings.overwrite)  # refuses, or removes old files
    changes = version_changes(previous, manifest) if previous and finished else {}
    if changes:
        said = ", ".join(f"{name} {old} -> {new}" for name, (old, new) in changes.items())
        log(f"note: the {len(finished)} file(s) already in {output_dir} were made with other versions ({said}); "
            f"they are kept, and runs.jsonl records it; `python -m pyramid.verify {output_dir} --input_dir "
            f"{settings.input_dir} --recompute 64` compares a sample")
    remove_abandoned_temporaries(temporaries)
    damaged = find_damaged_outputs(output_dir, finished & {output_path_for(image) for image in images})
    if damaged:
        log(f"{len(damaged)} file(s) cut short by a crash (empty or truncated) will be written again, "
            f"e.g. {min(damaged)}")
    todo = images_to_do(images, finished - damaged)
    prune_failures(output_dir, set(todo))
    return Plan(todo=todo, found=len(images), skipped=len(images) - len(todo), model_info=info,
                version_changes=changes, new_manifest=previous is None, needed_bytes=needed, free_bytes=free)


def check_free_space(settings, info, images, output_dir):
    """(bytes the files still to write need, bytes free on the disk of `output_dir`, or of its nearest existing
    parent); a UsageError when they do not fit, unless --ignore_free_space. A run that learns it lacks space
    hours later has wasted those hours."""
    finished, _ = scan_outputs(output_dir)
    per_file = estimated_file_bytes(pyramid_sizes(info.grid_size), info.hidden_size, settings.flip,
                                    settings.store_dtype)
    count = len(images_to_do(images, finished))
    existing = next(parent for parent in [output_dir, *output_dir.absolute().parents] if parent.exists())
    free = shutil.disk_usage(existing).free
    if count * per_file > free and not settings.ignore_free_space:
        raise UsageError(f"the {count} images to do need about {format_bytes(count * per_file)} in {output_dir} "
                         f"({format_bytes(per_file)} a file) and its disk has {format_bytes(free)} free; free some "
                         f"space or use another --output_dir (--ignore_free_space starts anyway)")
    return count * per_file, free
