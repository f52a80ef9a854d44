"""pyramid/validate.py and its callers: each hostile input (tests/hostile_files.py) ends as a refusal in one
line naming its file, an error naming it, or a damaged part left unserved; never a hang, a crash, a write
outside the tree or a wrong value served. One real tree is made per module; each test damages a copy."""

import json
import os
import shutil
import tracemalloc

import hostile_files as hostile
import numpy as np
import pytest
import torch
from hostile_names import finishes_within

import pyramid.reader
import pyramid.tree
from pyramid import PyramidDataset, exits
from pyramid.exits import DamagedFile
from pyramid.lock import live_run
from pyramid.pack import build_pack
from pyramid.pack import get_args_parser as pack_parser
from pyramid.pack import main as pack_main
from pyramid.reader import expected_from, read_pyramid
from pyramid.show import get_args_parser as show_parser
from pyramid.show import main as show_main
from pyramid.stats import get_args_parser as stats_parser
from pyramid.stats import main as stats_main
from pyramid.synthetic import LEVELS, make_pyramid, write_tree
from pyramid.tree import LOCK_NAME, is_level_name, pack_dir, pack_level_path, read_manifest
from pyramid.verify import get_args_parser as verify_parser
from pyramid.verify import main as verify_main
from pyramid.writer import save_atomic

NAMES = ["00000", "00001", "00002", "00003"]


@pytest.fixture(scope="module")
def real_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("real") / "tree"
    write_tree(root, NAMES)  # the extractor's bytes: one layout for every file
    build_pack(root, LEVELS)
    return root


@pytest.fixture
def tree(real_tree, tmp_path):
    copy = tmp_path / "tree"
    shutil.copytree(real_tree, copy, copy_function=shutil.copy2)  # mtimes kept: the pack stays current
    return copy


def finishes(function, *args):
    """function(*args), which must return within a minute (a FIFO would block it forever)."""
    return finishes_within(60, function, *args)


def tool(main, parser, *args):
    return finishes(main, parser().parse_args([str(arg) for arg in args]))


def one_error_line(capsys):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ----------------------------------------------------------------------------- 1. nothing written outside the tree


def test_level_names_are_strict():
    assert all(is_level_name(name) for name in ("1x1", "16x16", "flip/8x8", "518x518"))
    assert not any(is_level_name(name) for name in ("08x08", "0x0", "8x4", "../8x8", "/tmp/x", "flip/../x",
                                                    "\u0663x\u0663", "8x8/", "x", "", None, 8))
    with pytest.raises(ValueError, match="is not a level name"):
        pack_level_path("pack", "../../x")


@pytest.mark.parametrize("key", ["../../escaped", "ABSOLUTE"])
def test_pack_refuses_keys_that_are_paths_and_writes_nothing_outside(tree, tmp_path, capsys, key):
    outside = tmp_path / "outside"
    outside.mkdir()
    key = str(outside / "escaped") if key == "ABSOLUTE" else key
    (tree / "manifest.json").unlink()  # without a manifest, the first file's keys name the levels
    shutil.rmtree(pack_dir(tree))
    torch.save({key: torch.zeros(1, 1, 8), **make_pyramid(0)}, tree / "00000.pt")
    before = sorted(path for path in tmp_path.rglob("*") if path.suffix == ".npy")
    assert tool(pack_main, pack_parser, tree) == exits.USAGE
    assert one_error_line(capsys) == (f"error: {tree / '00000.pt'}: {key!r} is not a level name ('{{s}}x{{s}}' "
                                      f"or 'flip/{{s}}x{{s}}')")
    with pytest.raises(ValueError, match="is not a level name"):
        build_pack(tree, [key])
    assert sorted(path for path in tmp_path.rglob("*") if path.suffix == ".npy") == before
    assert not list(tmp_path.rglob("escaped*"))


def test_a_manifest_whose_levels_are_paths_is_refused_by_every_tool(tree, capsys):
    hostile.edit_json(tree / "manifest.json", levels=["../../x", "1x1"])
    message = f"error: {tree / 'manifest.json'}: '../../x' is not a level name ('{{s}}x{{s}}' or 'flip/{{s}}x{{s}}')"
    for main, parser in ((pack_main, pack_parser), (stats_main, stats_parser)):
        assert tool(main, parser, tree) == exits.USAGE
        assert one_error_line(capsys) == message
    with pytest.raises(DamagedFile, match="is not a level name"):
        PyramidDataset(tree)
    assert not (tree.parent.parent / "x.npy").exists()


def test_a_pack_record_whose_levels_are_paths_is_never_read(tree):
    record = json.loads((pack_dir(tree) / "pack.json").read_text())
    record["levels"][0] = record["shapes"]["../x"] = "../x"
    (pack_dir(tree) / "pack.json").write_text(json.dumps(record))
    with pytest.warns(UserWarning, match=r"pack\.json: '\.\./x' is not a level name"):
        assert PyramidDataset(tree).source == "files"


# ----------------------------------------------------------------------------- 2. the reader's bounds


def test_a_record_claiming_1_gib_is_refused_before_any_allocation(tree):
    path = tree / "00001.pt"
    hostile.claim_record_size(path, "data.pkl", 1 << 30)
    tracemalloc.start()
    try:
        with pytest.raises(DamagedFile) as error:
            read_pyramid(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(error.value).startswith(f"{path}: record 'archive/data.pkl' claims 1073741824 bytes")
    assert peak < 16 << 20, peak


def test_a_negative_shape_is_never_served(tree):
    path = tree / "00001.pt"
    hostile.rewrite_tensor(path, "8x8", (-1, -64, 8))
    row = np.zeros((64, 8), np.float32)
    for out in (None, {"8x8": row}):
        with pytest.raises(DamagedFile, match=r"00001\.pt: '8x8' has shape \[-1, -64, 8\]: not sizes"):
            read_pyramid(path, ["8x8"], out=out)
    hostile.rewrite_tensor(tree / "00002.pt", "8x8", (1, 32, 16))  # as many values, the shape of no 8x8 level
    with pytest.raises(DamagedFile, match=r"00002\.pt: 8x8 has shape \[1, 32, 16\]; a level holds \[1, 64, D\]"):
        read_pyramid(tree / "00002.pt", ["1x1"])


def test_a_damaged_file_fails_the_same_whatever_was_read_before(tree):
    good, damaged = tree / "00000.pt", tree / "00001.pt"
    assert good.stat().st_size == damaged.stat().st_size
    hostile.break_directory(damaged)
    errors = []
    for before in (None, good):  # parsed afresh, then with the layout of a good file of the same size at hand
        pyramid.reader._layouts.clear()
        pyramid.reader._last[0] = None
        if before is not None:
            read_pyramid(before, ["1x1"])
        with pytest.raises(DamagedFile) as error:
            read_pyramid(damaged, ["1x1"])
        errors.append(str(error.value))
    assert errors[0] == errors[1] and errors[0].startswith(f"{damaged}: cannot be read (")


def test_files_are_checked_against_the_manifest(tree):
    expect = expected_from(read_manifest(tree))
    read_pyramid(tree / "00000.pt", ["1x1"], expect=expect)
    torch.save(make_pyramid(1, hidden=4), tree / "00001.pt")
    with pytest.raises(DamagedFile, match=r"00001\.pt: 16x16 is torch.float32 \[1, 256, 4\]; manifest.json says "
                                          r"torch.float32 \[1, 256, 8\]"):
        read_pyramid(tree / "00001.pt", ["1x1"], expect=expect)
    with open(tree / "00002.pt", "ab") as file:
        file.truncate(expect.most_bytes + 1)  # zeros past the end: more than the levels can take
    with pytest.raises(DamagedFile, match=r"00002\.pt: is \d+ bytes; the levels manifest.json names take at most"):
        read_pyramid(tree / "00002.pt", expect=expect)
    with pytest.raises(DamagedFile, match=r"00001\.pt: 16x16 is torch.float32 \[1, 256, 4\]"):
        PyramidDataset(tree, pack=False)[1]


# ----------------------------------------------------------------------------- 3. the pack checked before serving


@pytest.mark.parametrize("damage, problem", [
    (dict(fortran=True), "is in Fortran order, its rows are not contiguous"),
    (dict(row_shape=(128, 4)), "has shape [4, 128, 4], pack.json and manifest.json say [4, 64, 8]"),
    (dict(dtype=np.float64), "holds float64, the tree's files hold float32"),
])
def test_a_rewritten_pack_array_is_never_served_and_verify_names_it(tree, capsys, damage, problem):
    path = pack_level_path(pack_dir(tree), "8x8")
    hostile.rewrite_npy(path, **damage)
    shutil.copystat(tree / "00000.pt", tree / "00000.pt")  # the files unchanged: the pack is current
    with pytest.warns(UserWarning, match="is not used"):
        dataset = PyramidDataset(tree, levels=["8x8"])
    assert dataset.source == "files"
    assert torch.equal(dataset[2]["8x8"], make_pyramid(2)["8x8"][0])
    with pytest.raises(ValueError, match="cannot be used"):
        PyramidDataset(tree, levels=["8x8"], pack=True)
    assert tool(verify_main, verify_parser, tree) == 1
    assert f"{path}: {problem}; rerun python -m pyramid.pack to rebuild the pack" in capsys.readouterr().out


def test_stats_never_loops_on_the_count_of_pack_json(tree, capsys):
    hostile.edit_json(pack_dir(tree) / "pack.json", count=10 ** 12)
    assert tool(stats_main, stats_parser, tree) == exits.OK
    assert "read from the files" in capsys.readouterr().out
    assert torch.load(tree / "stats.pt", weights_only=True)["count"] == len(NAMES)


# ----------------------------------------------------------------------------- 4. errors that name their file


def test_a_truncated_file_is_named_by_stats_pack_and_the_dataset(tree, capsys):
    path = tree / "00002.pt"
    path.write_bytes(path.read_bytes()[:3000])
    for main, parser, what in ((stats_main, stats_parser, "no stats written"), (pack_main, pack_parser,
                                                                                "nothing packed")):
        assert tool(main, parser, tree, "--workers", 2) == exits.DAMAGED_INPUT
        line = one_error_line(capsys)
        assert line.startswith(f"error: {path}: cannot be read (") and what in line, line
    with pytest.raises(DamagedFile, match=f"^{path}: cannot be read"):
        PyramidDataset(tree, pack=False)[2]
    with pytest.raises(DamagedFile, match=f"^{path}: cannot be read"):
        next(iter(PyramidDataset(tree, pack=False).loader(4)))


def bad_json_cases():
    cases = [(name, lambda path, data=data: path.write_bytes(data)) for name, data in hostile.BAD_JSON.items()]
    return cases + [("a directory", hostile.replace_with_directory), ("a FIFO", hostile.make_fifo)]


@pytest.mark.parametrize("name, damage", bad_json_cases(), ids=[case[0] for case in bad_json_cases()])
def test_a_malformed_manifest_is_refused_in_one_line(tree, capsys, name, damage):
    damage(tree / "manifest.json")
    for main, parser in ((stats_main, stats_parser), (pack_main, pack_parser)):
        assert tool(main, parser, tree) == exits.USAGE
        assert one_error_line(capsys).startswith(f"error: {tree / 'manifest.json'}: ")
    with pytest.raises(DamagedFile, match=f"^{tree / 'manifest.json'}: "):
        finishes(PyramidDataset, tree)
    assert tool(verify_main, verify_parser, tree) == 1
    assert f"{tree / 'manifest.json'}: " in capsys.readouterr().out


@pytest.mark.parametrize("change", [dict(hidden_size="8"), dict(flip="yes"), dict(levels="16x16"),
                                    dict(store_dtype="fp64")])
def test_a_manifest_of_wrong_types_is_refused_in_one_line(tree, capsys, change):
    hostile.edit_json(tree / "manifest.json", **change)
    assert tool(stats_main, stats_parser, tree) == exits.USAGE
    key = next(iter(change))
    assert one_error_line(capsys).startswith(f"error: {tree / 'manifest.json'}: {key}")


@pytest.mark.parametrize("name, damage", bad_json_cases(), ids=[case[0] for case in bad_json_cases()])
def test_a_malformed_pack_record_is_never_served_and_pack_rebuilds_it(tree, capsys, name, damage):
    damage(pack_dir(tree) / "pack.json")
    with pytest.warns(UserWarning, match=r"pack\.json: "):
        assert finishes(PyramidDataset, tree).source == "files"
    assert tool(verify_main, verify_parser, tree) == 1
    assert f"{pack_dir(tree) / 'pack.json'}: " in capsys.readouterr().out
    assert tool(pack_main, pack_parser, tree) == exits.OK
    assert PyramidDataset(tree).source == "pack"


@pytest.mark.parametrize("name, damage", bad_json_cases() + [
    ("wrong types", lambda path: path.write_text(json.dumps({"host": 5, "pid": -1, "slurm_job": "7",
                                                             "slurm_restart": "x"})))],
    ids=[case[0] for case in bad_json_cases()] + ["wrong types"])
def test_a_malformed_lock_never_crashes_a_tool(tree, capsys, name, damage):
    (tree / LOCK_NAME).write_text("{}")
    damage(tree / LOCK_NAME)
    if name in ("a directory", "a FIFO"):  # no run's lock: refused, naming it
        assert tool(stats_main, stats_parser, tree) == exits.USAGE
        assert one_error_line(capsys).startswith(f"error: {tree / LOCK_NAME}: is {name}, not a regular file")
    else:  # a torn or foreign lock counts by its age alone: fresh, so it holds the tree
        assert "host ?" in finishes(live_run, tree)


# ----------------------------------------------------------------------------- 5. only regular files are read


def test_a_fifo_among_the_files_hangs_nothing(tree, capsys):
    fifo = hostile.make_fifo(tree / "00001.pt")
    with pytest.raises(DamagedFile, match=f"^{fifo}: is a FIFO, not a regular file"):
        finishes(read_pyramid, fifo)
    # No pyramid (tree.scan_outputs): the tools go over the regular files, never open it.
    assert tool(stats_main, stats_parser, tree) == exits.OK
    assert torch.load(tree / "stats.pt", weights_only=True)["count"] == len(NAMES) - 1
    assert tool(pack_main, pack_parser, tree) == exits.OK
    assert tool(verify_main, verify_parser, tree) == exits.OK
    assert "checked 3 files" in capsys.readouterr().out
    assert finishes(PyramidDataset, tree).names == ["00000", "00002", "00003"]
    assert finishes(show_main, show_parser().parse_args([str(fifo), "-o", str(tree / "x.png")])) == exits.USAGE
    assert one_error_line(capsys).startswith(f"error: {fifo}: is a FIFO")
    with pytest.raises(DamagedFile, match=f"{fifo}: is a FIFO, not a regular file"):  # one that scan_outputs missed
        finishes(pyramid.tree.file_records, tree, ["00001.pt"])


def test_save_atomic_files_still_read_by_the_fast_path(tmp_path, monkeypatch):
    # The checks read nothing beyond the plan: every level of a file is still one preadv from its first byte.
    for index in range(2):
        save_atomic(make_pyramid(index), tmp_path / f"{index}.pt")
    (tmp_path / "manifest.json").write_text(json.dumps({"levels": LEVELS, "hidden_size": 8, "flip": False}))
    expect = expected_from(read_manifest(tmp_path))
    read_pyramid(tmp_path / "0.pt", expect=expect)
    calls = []
    preadv = os.preadv
    monkeypatch.setattr(os, "preadv", lambda *args: calls.append(args[2]) or preadv(*args))
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: pytest.fail("torch.load for a plain file"))
    got, _ = read_pyramid(tmp_path / "1.pt", expect=expect)
    assert calls == [0] and all(torch.equal(got[level], make_pyramid(1)[level]) for level in LEVELS)
