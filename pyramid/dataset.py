"""PyramidDataset, the reader for the training phase."""

from pathlib import Path

import torch
from torch.utils.data import Dataset

from pyramid.manifest import read_manifest
from pyramid.paths import OUTPUT_SUFFIX, scan_outputs


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
        finished, _ = scan_outputs(self.root)
        self.files = sorted(finished)  # relative POSIX paths, sorted as strings: the same order everywhere
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
        manifest = read_manifest(self.root)
        if manifest is not None:
            return list(manifest["levels"])
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
        item = {"name": relative.removesuffix(OUTPUT_SUFFIX)}
        for level in self.levels:
            if level not in pyramid:
                raise KeyError(f"{path} has no level {level!r}; it has {list(pyramid)}.")
            item[level] = pyramid[level][0].clone()  # (s*s, D)
        return item
