"""Hostile and unusual names for the tests: names that are not UTF-8, names too long for a temporary, images
named like the output tree's own files, and entries that are no regular file where a pyramid goes.

Each maker builds one such thing on disk and returns its path; the tests say what the extractor must do.
"""

import os
import socket
import threading
from pathlib import Path

from PIL import Image

# Names as Python holds them: a byte that starts no UTF-8 sequence becomes a lone surrogate (surrogateescape).
NOT_UTF8_IMAGE = os.fsdecode(b"good\xff.png")
NOT_UTF8_BROKEN = os.fsdecode(b"bad\xfe.png")
# Names an image may have that an output tree keeps for itself (tree.reserved_output).
TREE_NAMED_IMAGES = ("stats.png", "pack/x.png", ".x.pt.tmp.foo.png", "manifest.json/a.png", ".pyramid.lock.d/a.png")
# Names of the tree's kind that are ordinary images: flip/ levels live inside files and under pack/ only.
ORDINARY_IMAGES = ("flip/z.png", "statistics.png", "a/stats.png", "a/pack/x.png")


def long_name(length=250, suffix=".png"):
    """A file name of `length` bytes: fits NAME_MAX (255) itself, but not with a temporary's ~30 more bytes."""
    return "x" * (length - len(suffix)) + suffix


def image(path, size=(40, 30), seed=0):
    """A small valid PNG at `path` (its folders made)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = bytes((seed * 31 + i * 7) % 256 for i in range(size[0] * size[1] * 3))
    Image.frombytes("RGB", size, pixels).save(path, format="PNG")
    return path


def broken_image(path):
    """A file with an image suffix that is no image."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not an image at all")
    return path


def fifo(path):
    """A FIFO at `path`: whoever opens it to read waits for a writer that never comes."""
    os.mkfifo(path)
    return Path(path)


def unix_socket(path):
    """A bound Unix socket at `path` (the socket object is closed; its file stays)."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(os.fspath(path))
    return Path(path)


def folder(path):
    """A folder where a file should be."""
    Path(path).mkdir(parents=True)
    return Path(path)


def link(path, target):
    """A symbolic link at `path` to `target`."""
    os.symlink(target, path)
    return Path(path)


def finishes_within(seconds, call, *args):
    """call(*args)'s result, from a daemon thread given `seconds`: a program that opens a FIFO to read it
    waits for ever, and the test says so instead of hanging the suite."""
    outcome = {}

    def run():
        try:
            outcome["result"] = call(*args)
        except BaseException as error:  # raised in the test's thread below
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{getattr(call, '__name__', call)} still waiting after {seconds} s (a FIFO?)"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
