"""pyramid/dataset.py: PyramidDataset over a synthetic output tree, directly and through DataLoader workers."""

import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader

from conftest import REPO
from pyramid import PyramidDataset
from pyramid.synthetic import HIDDEN, LEVELS, make_pyramid, numbered_names, write_tree

# Written in this order (seed = index); read back sorted by POSIX path: "a-b" < "a/c" < "b" < "z".
WRITTEN = ["z", "a/c", "b", "a-b", "A/x"]
SORTED = ["A/x", "a-b", "a/c", "b", "z"]


@pytest.fixture
def tree(tmp_path):
    root = write_tree(tmp_path / "pyramids", WRITTEN)
    (root / ".b.pt.tmp.99").write_bytes(b"partial")  # a writer's leftover: not an item
    (root / "notes.txt").write_text("not a pyramid")
    return root


def expected_level(name, level):
    return make_pyramid(WRITTEN.index(name))[level][0]  # (s*s, D)


def test_length_order_names_and_values(tree):
    dataset = PyramidDataset(tree)
    assert len(dataset) == len(SORTED)
    assert dataset.levels == LEVELS
    for index, name in enumerate(SORTED):
        item = dataset[index]
        assert list(item) == ["name", *LEVELS]
        assert item["name"] == name
        for level in LEVELS:
            side = int(level.split("x")[0])
            assert item[level].shape == (side * side, HIDDEN) and item[level].dtype == torch.float32
            assert torch.equal(item[level], expected_level(name, level))


def test_only_the_levels_asked_for(tree):
    item = PyramidDataset(tree, levels=["1x1", "8x8"])[SORTED.index("b")]
    assert list(item) == ["name", "1x1", "8x8"]
    assert torch.equal(item["8x8"], expected_level("b", "8x8"))


def test_unknown_level_names_the_available_ones(tree):
    available = r"\['16x16', '8x8', '4x4', '2x2', '1x1'\]"
    with pytest.raises(ValueError, match=r"unknown level\(s\) \['32x32'\]; available: " + available):
        PyramidDataset(tree, levels=["8x8", "32x32"])
    with pytest.raises(TypeError, match="not a string"):
        PyramidDataset(tree, levels="8x8")


def test_levels_from_the_first_file_without_a_manifest(tmp_path):
    root = write_tree(tmp_path / "pyramids", ["a", "b"], with_manifest=False)
    assert PyramidDataset(root).levels == LEVELS
    with pytest.raises(ValueError, match="available"):
        PyramidDataset(root, levels=["3x3"])


def test_missing_root_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        PyramidDataset(tmp_path / "nowhere")


def test_dataloader_with_two_workers(tree):
    loader = DataLoader(PyramidDataset(tree, levels=["4x4", "1x1"]), batch_size=2, num_workers=2)
    batches = list(loader)
    assert [name for batch in batches for name in batch["name"]] == SORTED
    assert [batch["4x4"].shape for batch in batches] == [(2, 16, HIDDEN), (2, 16, HIDDEN), (1, 16, HIDDEN)]
    assert all(set(batch) == {"name", "4x4", "1x1"} for batch in batches)
    assert torch.equal(batches[1]["1x1"][1], expected_level("b", "1x1"))
    assert torch.equal(batches[2]["4x4"][0], expected_level("z", "4x4"))


def test_importing_the_package_does_not_load_torch():
    # extract_distributed.py imports pyramid.exits and refuses bad arguments before torch loads.
    code = "import sys, pyramid.exits; print('torch' in sys.modules); from pyramid import PyramidDataset"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize("grid, levels", [(14, ["14x14", "7x7"]), (32, ["32x32", "16x16", "8x8", "4x4", "2x2", "1x1"])])
def test_other_grids_read_stat_and_pack_like_16(tmp_path, grid, levels):
    """DINOv3's 14x14 and 7x7, DINOv2 at 448's 32x32 to 1x1: the stats, the pack and the reader follow the
    manifest's levels, and the pack serves what the files hold."""
    from pyramid import pack, stats

    root = write_tree(tmp_path / "tree", numbered_names(5), grid=grid)
    assert stats.main(stats.get_args_parser().parse_args([str(root)])) == 0
    assert [key for key in torch.load(root / "stats.pt", weights_only=True) if "x" in key] == levels
    from_files = [PyramidDataset(root, normalize=True)[i] for i in range(5)]
    assert pack.main(pack.get_args_parser().parse_args([str(root)])) == 0
    dataset = PyramidDataset(root, normalize=True)
    assert [list(item) for item in from_files] == [list(dataset[0])] * 5
    for i, item in enumerate(from_files):
        assert all(torch.equal(item[level], dataset[i][level]) for level in levels)
    batch = next(iter(dataset.loader(batch_size=5)))
    assert [tuple(batch[level].shape) for level in levels] == [(5, int(level.split("x")[0]) ** 2, 8)
                                                               for level in levels]
