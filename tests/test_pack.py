"""pyramid/pack.py: the packed copy, its currency check, atomic rebuilds, and PyramidDataset on it."""

import json
import os
import re
import sys
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import pyramid.reader
import warm
from conftest import REPO
from pyramid import PyramidDataset
from pyramid.pack import build_pack
from pyramid.pack import get_args_parser as pack_parser
from pyramid.pack import main as pack_main
from pyramid.synthetic import LEVELS, make_pyramid, write_tree
from pyramid.tree import PACK_TEMPORARY_PREFIX, pack_dir, read_pack_record
from pyramid.verify import get_args_parser as verify_parser
from pyramid.verify import main as verify_main

WRITTEN = ["z", "a/c", "b", "a-b", "A/x", "m"]
SORTED = ["A/x", "a-b", "a/c", "b", "m", "z"]


@pytest.fixture
def tree(tmp_path):
    return write_tree(tmp_path / "pyramids", WRITTEN)


def run_pack(*args):
    return warm.run([sys.executable, "-m", "pyramid.pack", *map(str, args)], cwd=REPO,
                    capture_output=True, text=True, timeout=120)


def items(dataset):
    return [dataset[index] for index in range(len(dataset))]


def assert_same_items(got, expected):
    assert [item["name"] for item in got] == [item["name"] for item in expected]
    for a, b in zip(got, expected):
        assert list(a) == list(b)
        for level in list(a)[1:]:
            assert a[level].dtype == b[level].dtype and a[level].shape == b[level].shape
            assert torch.equal(a[level], b[level])


def test_cli_packs_every_level_in_sorted_order_and_reruns_as_a_no_op(tree, capsys):
    result = run_pack(tree)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("packed 6 files, levels ['16x16', '8x8', '4x4', '2x2', '1x1']")
    record = read_pack_record(tree)
    assert record["names"] == SORTED and record["levels"] == LEVELS
    for level in LEVELS:
        array = np.load(pack_dir(tree) / f"{level}.npy", mmap_mode="r")
        side = int(level.split("x")[0])
        assert array.dtype == np.float32 and array.shape == (6, side * side, 8)
        for row, name in enumerate(SORTED):
            assert np.array_equal(array[row], make_pyramid(WRITTEN.index(name))[level][0].numpy())
    assert pack_main(pack_parser().parse_args([str(tree)])) == 0
    assert "is current" in capsys.readouterr().out
    assert verify_main(verify_parser().parse_args([str(tree)])) == 0


def test_dataset_reads_the_pack_and_gives_the_files_items(tree):
    build_pack(tree, LEVELS)
    from_pack, from_files = PyramidDataset(tree), PyramidDataset(tree, pack=False)
    assert from_pack.source == "pack" and from_files.source == "files"
    assert_same_items(items(from_pack), items(from_files))
    subset = PyramidDataset(tree, levels=["1x1", "8x8"])
    assert subset.source == "pack"
    assert_same_items(items(subset), items(PyramidDataset(tree, levels=["1x1", "8x8"], pack=False)))
    for collate_fn in (None, PyramidDataset.collate):
        batches = list(DataLoader(from_pack, batch_size=4, num_workers=1, collate_fn=collate_fn))
        assert [name for batch in batches for name in batch["name"]] == SORTED
        assert torch.equal(batches[1]["4x4"][1], make_pyramid(WRITTEN.index("z"))["4x4"][0])
        assert batches[0]["16x16"].shape == (4, 256, 8)


@pytest.mark.parametrize("change, reason", [
    (lambda root: torch.save(make_pyramid(0), root / "b.pt"), "1 file(s) rewritten"),
    (lambda root: torch.save(make_pyramid(9), root / "new.pt"), "1 file(s) added"),
    (lambda root: (root / "a-b.pt").unlink(), "1 file(s) removed"),
    (lambda root: (root / "manifest.json").write_text(
        json.dumps({**json.loads((root / "manifest.json").read_text()), "dtype": "fp16"})),
     "manifest.json differs"),
])
def test_a_stale_pack_is_never_served(tree, change, reason, capsys):
    build_pack(tree, LEVELS)
    change(tree)
    with pytest.warns(UserWarning, match=re.escape(reason)):
        dataset = PyramidDataset(tree)
    assert dataset.source == "files"
    assert_same_items(items(dataset), items(PyramidDataset(tree, pack=False)))
    with pytest.raises(ValueError, match=re.escape(reason)):
        PyramidDataset(tree, pack=True)
    status = verify_main(verify_parser().parse_args([str(tree)]))
    assert status == 1  # the stale pack is named (and a changed manifest also fails the files)
    assert pack_main(pack_parser().parse_args([str(tree)])) == 0
    assert reason in capsys.readouterr().err
    assert PyramidDataset(tree).source == "pack"


def test_only_the_levels_packed_are_read_from_the_pack(tree):
    assert pack_main(pack_parser().parse_args([str(tree), "--levels", "4x4", "1x1"])) == 0
    assert sorted(path.name for path in pack_dir(tree).iterdir()) == ["1x1.npy", "4x4.npy", "pack.json"]
    assert PyramidDataset(tree, levels=["1x1"]).source == "pack"
    with pytest.warns(UserWarning, match=r"level\(s\) \['16x16'\] not packed"):
        assert PyramidDataset(tree, levels=["16x16", "1x1"]).source == "files"
    assert pack_main(pack_parser().parse_args([str(tree), "--levels", "3x3"])) == 2


def test_a_killed_pack_leaves_the_old_one_and_no_complete_looking_copy(tree, monkeypatch):
    build_pack(tree, LEVELS)
    before = (pack_dir(tree) / "8x8.npy").read_bytes()
    torch.save(make_pyramid(7), tree / "m.pt")  # the pack is stale now; a rebuild is killed midway
    calls = []

    def killed_after_two(path, levels=None, out=None, expect=None):
        calls.append(path)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return original(path, levels, out, expect)

    original = pyramid.reader.read_pyramid
    monkeypatch.setattr(pyramid.reader, "read_pyramid", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        build_pack(tree, LEVELS, workers=1)
    monkeypatch.undo()
    assert (pack_dir(tree) / "8x8.npy").read_bytes() == before  # the old pack, whole
    assert [entry.name for entry in tree.iterdir() if entry.name.startswith(".pack")] == []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert PyramidDataset(tree).source == "files"  # stale: not served

    # A SIGKILL leaves its temporary directory; it never counts as a pack, and the next pack removes it.
    leftover = tree / f"{PACK_TEMPORARY_PREFIX}{os.uname().nodename}@999999.1"
    leftover.mkdir()
    (leftover / "8x8.npy").write_bytes(b"partial")
    assert pack_main(pack_parser().parse_args([str(tree)])) == 0
    assert not leftover.exists() and PyramidDataset(tree).source == "pack"


def test_verify_finds_a_pack_row_that_differs_from_its_file(tree, capsys):
    build_pack(tree, LEVELS)
    array = np.load(pack_dir(tree) / "2x2.npy", mmap_mode="r+")
    array[SORTED.index("b"), 1, 3] += 1.0
    array.flush()
    del array
    status = verify_main(verify_parser().parse_args([str(tree)]))
    lines = capsys.readouterr().out.splitlines()
    assert status == 1
    assert [line for line in lines if "differs" in line] == [
        f"{tree / 'b.pt'}: 2x2 differs from its row 3 in {pack_dir(tree) / '2x2.npy'}; "
        f"rerun python -m pyramid.pack {tree}"]


def test_the_advice_to_rebuild_a_stale_pack_rebuilds_what_was_there(tree, capsys):
    """A pack of 4x4 and 1x1 gone stale: the warning, the refusal and verify give the command with those
    levels (a plain `pyramid.pack DIR` would pack every level: 73 GB for 70k base-size files)."""
    assert pack_main(pack_parser().parse_args([str(tree), "--levels", "4x4", "1x1"])) == 0
    torch.save(make_pyramid(9), tree / "new.pt")
    command = f"python -m pyramid.pack {tree} --levels 4x4 1x1"
    with pytest.warns(UserWarning, match=re.escape(f"{command} brings it up to date")):
        PyramidDataset(tree, levels=["1x1"])
    with pytest.raises(ValueError, match=re.escape(f"run python -m pyramid.pack {tree} --levels 8x8 4x4 1x1")):
        PyramidDataset(tree, levels=["8x8"], pack=True)
    capsys.readouterr()
    assert verify_main(verify_parser().parse_args([str(tree)])) == 1
    stale = f"is stale, so never read (1 file(s) added since it was packed); rerun {command}\n"
    assert stale in capsys.readouterr().out
    # The command given rebuilds exactly those levels; once every level is packed, the advice is plain.
    assert pack_main(pack_parser().parse_args(command.split()[3:])) == 0
    assert read_pack_record(tree)["levels"] == ["4x4", "1x1"]
    assert pack_main(pack_parser().parse_args([str(tree)])) == 0
    (tree / "new.pt").unlink()
    with pytest.warns(UserWarning, match=re.escape(f"python -m pyramid.pack {tree} brings it up to date")):
        PyramidDataset(tree, levels=["1x1"])
