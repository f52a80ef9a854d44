"""Find the images, map each to its output file, refuse clashes, and list the work still to do."""

import heapq
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

from pyramid.ptzip import is_complete_archive
from pyramid.tree import OUTPUT_SUFFIX

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
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


def find_damaged_outputs(output_dir, relative_outputs):
    """The relative outputs (of those given) whose file is not a complete archive (ptzip.is_complete_archive):
    files a node crash left empty or short. A rerun does them again."""
    root = Path(output_dir)
    relative_outputs = sorted(relative_outputs)
    with ThreadPoolExecutor(FOOTER_THREADS) as pool:
        complete = pool.map(lambda relative: is_complete_archive(root / relative), relative_outputs, chunksize=64)
        return {relative for relative, ok in zip(relative_outputs, complete) if not ok}
