"""PyramidDataset, the reader for the training phase."""

import json
import os
from pathlib import Path

import torch
from torch.utils.data import Dataset


def is_temporary(name):
    """True for a file name the writer uses before its rename: hidden and containing ".tmp"."""
    return name.startswith(".") and ".tmp" in name


def walk_output_tree(root):
    """(pyramid files, leftover temporaries) below `root`, each a sorted list of paths relative to it.

    Pyramid files are the `.pt` files that are not temporaries; every other file (manifest.json,
    failures.jsonl, notes) is ignored. Sorted by the relative POSIX path string, so the order is the
    same on every machine and for every run.
    """
    root = Path(root)
    pyramids, temporaries = [], []
    for directory, _, files in os.walk(root):
        for name in files:
            relative = (Path(directory) / name).relative_to(root)
            if is_temporary(name):
                temporaries.append(relative)
            elif relative.suffix == ".pt":
                pyramids.append(relative)
    return sorted(pyramids, key=Path.as_posix), sorted(temporaries, key=Path.as_posix)


class PyramidDataset(Dataset):
    """The pyramid files below `root`, in sorted order, one item per image.

    Item i is a dict: `"name"` is the image's path relative to `root` without its suffix, as a POSIX
    string (`"a/b/c"` for `a/b/c.pt`, made from `a/b/c.jpg`), and one `float32` tensor of shape
    `[s*s, D]` per level asked for (the stored `[1, s*s, D]` without its leading 1), so the default
    collate gives `{"name": [B names], "8x8": (B, 64, D), ...}`.

    `levels`: a list of level names such as `["4x4", "8x8"]`; None means every level. Only the
    levels asked for are read from disk (the files are memory-mapped). The available levels are
    those of manifest.json, or of the first file when there is no manifest.
    """

    def __init__(self, root, levels=None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root} is not a directory; pass the extractor's --output_dir.")
        files, _ = walk_output_tree(self.root)
        self.files = files
        available = self._available_levels()
        if levels is None:
            levels = available
        elif isinstance(levels, str):
            raise TypeError(f"levels must be a list of level names such as [{levels!r}], not a string.")
        unknown = [level for level in levels if level not in available]
        if unknown and available:
            raise ValueError(f"unknown level(s) {unknown}; available: {available}.")
        self.levels = list(levels)

    def _available_levels(self):
        manifest = self.root / "manifest.json"
        if manifest.is_file():
            return list(json.loads(manifest.read_text())["levels"])
        if self.files:
            return list(torch.load(self.root / self.files[0], weights_only=True, mmap=True))
        return []

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        relative = self.files[index]
        path = self.root / relative
        # mmap: only the pages of the levels asked for are read; clone so no item keeps the file mapped.
        pyramid = torch.load(path, weights_only=True, mmap=True)
        item = {"name": relative.with_suffix("").as_posix()}
        for level in self.levels:
            if level not in pyramid:
                raise KeyError(f"{path} has no level {level!r}; it has {list(pyramid)}.")
            item[level] = pyramid[level][0].clone()  # (s*s, D)
        return item
