"""Find the images, map each to its output file, refuse clashes, and list the work still to do."""

import heapq
import os
import stat
import struct
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

from pyramid.tree import OUTPUT_SUFFIX

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
# A .pt file is a zip archive; its last bytes hold the end-of-central-directory records.
TAIL_BYTES = 4096
ZIP_END = struct.Struct("<4s4H2LH")  # signature, disk numbers, entry counts, directory size, offset, comment
ZIP64_LOCATOR = struct.Struct("<4sLQL")  # signature, disk, offset of the zip64 end record, disks
ZIP64_END = struct.Struct("<4sQ2H2L4Q")  # ..., entries here, entries, directory size, directory offset
# Checking footers is a stat and a small read per file: on a network filesystem each waits a round
# trip, so several run at once.
FOOTER_THREADS = 16


def is_image_name(name):
    """True for a file name with an image suffix, in any letter case: 'A.JPG' -> True, 'a.txt' -> False."""
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def find_images(input_dir, skip=()):
    """Relative POSIX paths of every image under `input_dir`, recursively, sorted by that path.

    The directories in `skip` are never entered, whatever the name they are reached by: an output tree
    inside the input directory is not read as input (pictures that pyramid.show drew there, say). `skip`
    names that are `input_dir` itself or do not exist change nothing.

    Sorting the relative path string gives every process, run and machine the same order.

    Symbolic links are followed, but each real directory (by st_dev, st_ino) is read once, so a
    link loop such as `loop -> ..` ends, and a directory reachable under several names gives its
    images once, under one name: the one reached through the fewest links, then the first in sorted
    order. So `b/` wins over a sibling `a -> b`, and adding a link never renames images that are
    reachable without it. Two links to one file are two images, as two copies would be.

    A dangling link with an image name is listed once, like any file: the run records it as one
    failure (no such file), where it can be seen. Directories that cannot be read are skipped.
    """
    root = os.fspath(input_dir)
    found, seen = [], set()
    for directory in skip:
        try:
            status = os.stat(directory)
            if not os.path.samestat(status, os.stat(root)):
                seen.add((status.st_dev, status.st_ino))  # as if already read
        except OSError:
            continue
    # (links followed, relative path, absolute path): a directory is first claimed by its smallest key.
    waiting = [(0, "", root)]
    while waiting:
        links, relative_dir, directory = heapq.heappop(waiting)
        try:
            status = os.stat(directory)
            if (status.st_dev, status.st_ino) in seen:
                continue
            seen.add((status.st_dev, status.st_ino))
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            relative = f"{relative_dir}/{entry.name}" if relative_dir else entry.name
            try:
                is_directory = entry.is_dir()  # follows links; False for a dangling one
            except OSError:  # a link to itself (ELOOP), or unreadable: take it as a file
                is_directory = False
            if is_directory:
                heapq.heappush(waiting, (links + entry.is_symlink(), relative, entry.path))
            elif is_image_name(entry.name):
                found.append(relative)
    return sorted(found)


def output_path_for(relative_image_path):
    """The relative output file of an image: 'a/b/c.jpg' -> 'a/b/c.pt'."""
    return str(PurePosixPath(relative_image_path).with_suffix(OUTPUT_SUFFIX))


def find_clashes(relative_image_paths):
    """Groups of images that would write the same output file, e.g. [['a.jpg', 'a.png']]."""
    by_output = defaultdict(list)
    for path in relative_image_paths:
        by_output[output_path_for(path)].append(path)
    return [sorted(group) for _, group in sorted(by_output.items()) if len(group) > 1]


def images_to_do(relative_image_paths, finished_outputs):
    """The images whose output file does not exist yet, in the given order."""
    return [path for path in relative_image_paths if output_path_for(path) not in finished_outputs]


def is_complete_archive(path):
    """True when the regular file at `path` ends with a consistent zip footer, as every file torch.save wrote does.

    A file that a crash cut short (size 0, or data missing at its end) or whose last blocks never
    reached the disk (zeros) fails: the end record must sit in the last bytes, and the central
    directory it points to must end exactly where the end records begin, so the footer itself says
    how long the file must be. Reads at most TAIL_BYTES, never the whole file.
    """
    try:
        # Not blocking, not through a link: a FIFO swapped in since the scan is no archive, not a wait.
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW), "rb") as file:
            status = os.fstat(file.fileno())
            size = status.st_size
            if not stat.S_ISREG(status.st_mode) or size < ZIP_END.size:
                return False
            start = max(0, size - TAIL_BYTES)
            file.seek(start)
            tail = file.read()
    except OSError:
        return False
    end_at = len(tail) - ZIP_END.size
    signature, _, _, _, entries, directory_size, directory_offset, comment = ZIP_END.unpack_from(tail, end_at)
    if signature != b"PK\x05\x06" or comment != 0:
        return False
    records_start = start + end_at
    locator_at = end_at - ZIP64_LOCATOR.size
    if locator_at >= 0 and tail[locator_at:locator_at + 4] == b"PK\x06\x07":
        zip64_end = ZIP64_LOCATOR.unpack_from(tail, locator_at)[2]
        if zip64_end - start < 0 or tail[zip64_end - start:zip64_end - start + 4] != b"PK\x06\x06":
            return False
        fields = ZIP64_END.unpack_from(tail, zip64_end - start)
        entries, directory_size, directory_offset = fields[7], fields[8], fields[9]
        records_start = zip64_end
    if entries == 0 or directory_offset + directory_size != records_start:
        return False
    if directory_offset >= start and tail[directory_offset - start:directory_offset - start + 4] != b"PK\x01\x02":
        return False
    return True


def find_damaged_outputs(output_dir, relative_outputs):
    """The relative outputs (of those given) whose file is not a complete archive: files a node crash
    left empty or short. A rerun does them again."""
    root = Path(output_dir)
    relative_outputs = sorted(relative_outputs)
    with ThreadPoolExecutor(FOOTER_THREADS) as pool:
        complete = pool.map(lambda relative: is_complete_archive(root / relative), relative_outputs, chunksize=64)
        return {relative for relative, ok in zip(relative_outputs, complete) if not ok}
