"""pyramid/stats.py: exact float64 statistics against numpy, the same bits whatever the workers, order or source."""

import sys

import numpy as np
import pytest
import torch

import warm
from conftest import REPO
from pyramid import PyramidDataset
from pyramid.pack import build_pack
from pyramid.stats import BLOCK, compute_stats
from pyramid.synthetic import numbered_names, write_tree

COUNT = BLOCK + 6  # two blocks, the second one short
LEVELS = ["16x16", "8x8", "4x4", "2x2", "1x1"]
ALL_LEVELS = LEVELS + [f"flip/{level}" for level in LEVELS]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = write_tree(tmp_path_factory.mktemp("stats") / "tree", numbered_names(COUNT), flip=True)
    # Large means and small spreads in some channels, as DINOv2 features have: the sums must not cancel.
    for path in sorted(root.glob("*.pt")):
        pyramid = torch.load(path, weights_only=True)
        torch.save({key: value * 0.01 + 300.0 for key, value in pyramid.items()}, path)
    return root


def pyramid_files(root):
    return sorted(path for path in root.glob("*.pt") if path.name != "stats.pt")


def as_numpy(root, level):
    return np.stack([torch.load(path, weights_only=True)[level][0].numpy().astype(np.float64)
                     for path in pyramid_files(root)])  # (N, s*s, D)


def assert_identical(a, b):
    assert [key for key in a if key != "source"] == [key for key in b if key != "source"]
    for level in ALL_LEVELS:
        for name in ("mean", "std", "position_mean", "position_std"):
            assert torch.equal(a[level][name], b[level][name]), (level, name)


def test_cli_writes_the_contracts_stats_equal_to_numpy(tree):
    result = warm.run([sys.executable, "-m", "pyramid.stats", str(tree), "--workers", "2"], cwd=REPO,
                      capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    stats = torch.load(tree / "stats.pt", weights_only=True)
    assert stats["count"] == COUNT and [key for key in stats if key not in ("count", "source")] == ALL_LEVELS
    for level in ALL_LEVELS:
        values = as_numpy(tree, level)
        side = int(level.split("/")[-1].split("x")[0])
        expected = {"mean": values.mean(axis=(0, 1)), "std": values.std(axis=(0, 1)),
                    "position_mean": values.mean(axis=0), "position_std": values.std(axis=0)}
        for name, reference in expected.items():
            got = stats[level][name]
            assert got.dtype == torch.float64 and got.shape == reference.shape
            assert got.shape[-1] == 8 and (name in ("mean", "std") or got.shape[0] == side * side)
            # numpy's float64 pairwise sums against ours: agreement to float64 rounding.
            np.testing.assert_allclose(got.numpy(), reference, rtol=1e-10, atol=0)
    assert len(PyramidDataset(tree)) == COUNT  # stats.pt is not an item


def test_the_same_bits_whatever_the_workers_the_source_or_the_order_written(tree, tmp_path):
    from_files = compute_stats(tree, workers=1, use_pack=False)
    assert_identical(compute_stats(tree, workers=5, use_pack=False), from_files)
    build_pack(tree, ALL_LEVELS)
    from_pack = compute_stats(tree, workers=2)
    assert from_pack["source"]["read_from"] == "pack"
    assert_identical(from_pack, from_files)
    # The same files written in reverse order (other mtimes and inodes): the same statistics.
    other = tmp_path / "reversed"
    other.mkdir()
    (other / "manifest.json").write_bytes((tree / "manifest.json").read_bytes())
    for path in reversed(pyramid_files(tree)):
        (other / path.name).write_bytes(path.read_bytes())
    assert_identical(compute_stats(other, workers=3, use_pack=False), from_files)


def test_normalize_applies_the_stats_and_refuses_missing_or_stale_ones(tree, tmp_path):
    other = tmp_path / "copy"
    other.mkdir()
    (other / "manifest.json").write_bytes((tree / "manifest.json").read_bytes())
    for path in pyramid_files(tree)[:5]:
        (other / path.name).write_bytes(path.read_bytes())
    with pytest.raises(FileNotFoundError, match="python -m pyramid.stats"):
        PyramidDataset(other, normalize=True)
    stats = compute_stats(other, workers=1)
    torch.save(stats, other / "stats.pt")
    normalized, plain = PyramidDataset(other, normalize=True), PyramidDataset(other)
    for level in LEVELS:
        expected = (plain[2][level].double() - stats[level]["mean"]) / stats[level]["std"]
        # float32 to within its rounding, although the channels' means are 30,000 times their spread
        assert torch.allclose(normalized[2][level].double(), expected, rtol=1e-6, atol=1e-6)
    values = torch.stack([normalized[i]["16x16"] for i in range(5)]).double()  # (5, 256, D)
    assert torch.allclose(values.mean(dim=(0, 1)), torch.zeros(8, dtype=torch.float64), atol=1e-4)
    assert torch.allclose(values.std(dim=(0, 1), correction=0), torch.ones(8, dtype=torch.float64), atol=1e-4)
    (other / pyramid_files(tree)[0].name).unlink()
    with pytest.raises(ValueError, match="stats.pt was computed from other files"):
        PyramidDataset(other, normalize=True)


def test_flip_random_serves_either_twin_under_the_plain_keys(tree):
    plain = PyramidDataset(tree, levels=["4x4", "1x1"], pack=False)
    mirrored = PyramidDataset(tree, levels=["flip/4x4", "flip/1x1"], pack=False)
    flipping = PyramidDataset(tree, levels=["4x4", "1x1"], flip="random", pack=False)
    torch.manual_seed(0)
    first = [flipping[i] for i in range(20)]
    twins = []
    for index, item in enumerate(first):
        assert list(item) == ["name", "4x4", "1x1"]
        is_plain = torch.equal(item["4x4"], plain[index]["4x4"])
        is_mirror = torch.equal(item["4x4"], mirrored[index]["flip/4x4"])
        assert is_plain != is_mirror
        assert torch.equal(item["1x1"], (plain if is_plain else mirrored)[index][("" if is_plain else "flip/") + "1x1"])
        twins.append(is_mirror)
    assert 3 <= sum(twins) <= 17  # both twins, in about equal numbers
    torch.manual_seed(0)
    assert all(torch.equal(a["4x4"], flipping[i]["4x4"]) for i, a in enumerate(first))  # seeded
    with pytest.raises(ValueError, match="must be False or 'random'"):
        PyramidDataset(tree, flip=True)
