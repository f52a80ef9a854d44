"""Small synthetic output trees, made the way the contract says, for the verify and dataset tests."""

import json

import torch

GRID, HIDDEN = 16, 8
LEVELS = ["16x16", "8x8", "4x4", "2x2", "1x1"]


def make_pyramid(seed, grid=GRID, hidden=HIDDEN):
    """A correct pyramid: a random (1, grid*grid, D) level, then true 2x2 means down to 1x1."""
    generator = torch.Generator().manual_seed(seed)
    level = torch.randn(1, grid * grid, hidden, generator=generator)
    pyramid, side = {}, grid
    while True:
        pyramid[f"{side}x{side}"] = level
        if side % 2:
            return pyramid
        grid_view = level.reshape(1, side // 2, 2, side // 2, 2, hidden)  # (1, s/2, 2, s/2, 2, D)
        side //= 2
        level = grid_view.mean(dim=(2, 4)).reshape(1, side * side, hidden).contiguous()


def manifest(grid=GRID, hidden=HIDDEN):
    """A manifest.json dict for trees made by make_pyramid."""
    levels = list(make_pyramid(0, grid, hidden))
    return {"format": 1, "model": "tiny", "revision": None, "dtype": "fp32", "crop_size": grid * 14,
            "patch_size": 14, "grid_size": grid, "levels": levels, "hidden_size": hidden,
            "num_register_tokens": 0, "versions": {"torch": torch.__version__}}


def write_tree(output_dir, names, with_manifest=True):
    """Write one pyramid per relative name (`"a/b"` -> `a/b.pt`, seeded by its index) and a manifest."""
    output_dir.mkdir(parents=True, exist_ok=True)
    for index, name in enumerate(names):
        path = output_dir / f"{name}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(make_pyramid(index), path)
    if with_manifest:
        (output_dir / "manifest.json").write_text(json.dumps(manifest()))
    return output_dir
