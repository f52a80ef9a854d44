"""pyramid/paths.py: discovery, output mapping, clashes, temporaries, the to-do list."""

import json
import os
import subprocess
import sys
import time

import hostile_names
import pytest
import torch

from conftest import run_cli, write_images
from pyramid.paths import (
    find_clashes,
    find_damaged_outputs,
    find_images,
    images_to_do,
    output_path_for,
)
from pyramid.tree import is_abandoned_temporary, is_temporary_name, scan_outputs, temporary_name, writer_tag
from pyramid.writer import save_atomic


def touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")


def test_find_images_recursive_any_case_sorted_ignoring_others(tmp_path):
    for name in ["b.png", "a.JPG", "sub/c.jpeg", "sub/deeper/d.WebP", "e.bmp", "notes.txt", "x.pt", "y.gif",
                 "sub/.hidden_dir_ok.png"]:
        touch(tmp_path / name)
    assert find_images(tmp_path) == ["a.JPG", "b.png", "e.bmp", "sub/.hidden_dir_ok.png", "sub/c.jpeg",
                                     "sub/deeper/d.WebP"]


def test_output_path_for():
    assert output_path_for("00001.png") == "00001.pt"
    assert output_path_for("a/b/c.jpg") == "a/b/c.pt"
    assert output_path_for("a.b/c.d.JPEG") == "a.b/c.d.pt"


def test_find_clashes_names_both_images():
    assert find_clashes(["a.jpg", "a.png", "b.png", "s/a.png"]) == [["a.jpg", "a.png"]]
    assert find_clashes(["a.png", "b.png"]) == []


def test_temporary_names_are_hidden_and_recognised(tmp_path):
    temporary = temporary_name(tmp_path / "d" / "a.pt", "host@1.2")
    assert temporary.parent == tmp_path / "d"
    assert temporary.name.startswith(".") and not temporary.name.endswith(".pt")
    assert is_temporary_name(temporary.name)
    assert not is_temporary_name("a.pt")


def test_scan_outputs_and_images_to_do(tmp_path):
    touch(tmp_path / "a.pt")
    touch(tmp_path / "s" / "b.pt")
    touch(temporary_name(tmp_path / "c.pt", "h@1.1"))
    finished, temporaries = scan_outputs(tmp_path)
    assert finished == {"a.pt", "s/b.pt"}
    assert [p.split("/")[-1] for p in temporaries] == [temporary_name(tmp_path / "c.pt", "h@1.1").name]
    assert images_to_do(["a.png", "c.png", "s/b.jpg", "s/d.png"], finished) == ["c.png", "s/d.png"]
    assert scan_outputs(tmp_path / "missing") == (set(), [])


def test_abandoned_temporaries(tmp_path):
    live = temporary_name(tmp_path / "a.pt", writer_tag())  # this process: alive
    live.write_bytes(b"")
    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout.strip()
    dead = temporary_name(tmp_path / "b.pt", writer_tag().split("@")[0] + f"@{dead_pid}.1")
    dead.write_bytes(b"")
    foreign = temporary_name(tmp_path / "c.pt", "other-node@1.1")
    foreign.write_bytes(b"")
    assert not is_abandoned_temporary(live)
    assert is_abandoned_temporary(dead)
    assert not is_abandoned_temporary(foreign)  # fresh, from another machine: maybe still being written
    old = time.time() - 3600
    os.utime(foreign, (old, old))
    assert is_abandoned_temporary(foreign)


@pytest.mark.parametrize("link, target, expected", [
    ("loop", "..", ["a.png", "loop/beside.png", "sub/b.png"]),  # tmp_path, which holds `in`: links are followed
    ("sub/here", ".", ["a.png", "sub/b.png"]),
    ("sub/up", "../..", ["a.png", "sub/b.png", "sub/up/beside.png"]),
])
def test_find_images_link_loops_end_and_each_directory_is_read_once(tmp_path, link, target, expected):
    root = tmp_path / "in"
    for name in ["a.png", "sub/b.png"]:
        touch(root / name)
    touch(tmp_path / "beside.png")  # outside the input, reached only through a link to tmp_path
    os.symlink(target, root / link)
    assert find_images(root) == expected


def test_find_images_a_directory_under_two_names_is_listed_under_the_real_one(tmp_path):
    root = tmp_path / "in"
    touch(root / "b" / "x.png")
    os.symlink("b", root / "a")  # sorts before b, yet b needs no link: b's name is kept
    os.symlink("b", root / "c")
    touch(tmp_path / "elsewhere" / "y.png")
    os.symlink("../elsewhere", root / "z2")  # two links to one directory outside: the first in sorted order
    os.symlink("../elsewhere", root / "z1")
    os.symlink("./z1", root / "m")  # a link to a link counts as one link, and m sorts before z1
    touch(root / "b" / "deep" / "d.png")
    os.symlink("b/deep", root / "0shortcut")  # a link into the tree: the real path wins
    assert find_images(root) == ["b/deep/d.png", "b/x.png", "m/y.png"]


def test_find_images_lists_a_dangling_link_once(tmp_path):
    root = tmp_path / "in"
    touch(root / "a.png")
    os.symlink("missing.png", root / "gone.png")  # an image name: listed, the run records its failure
    os.symlink("no/such/dir", root / "gone_dir")  # no image name: nothing to list
    os.symlink("itself.png", root / "itself.png")  # a link to itself (ELOOP): listed once
    os.symlink("..", root / "loop")  # the loop that made each of them appear 41 times
    assert find_images(root) == ["a.png", "gone.png", "itself.png"]


def test_cli_through_a_link_loop_writes_each_image_once(tmp_path, tiny_model):
    root = tmp_path / "in"
    write_images(root, 2, seed=3)
    write_images(root / "sub", 1, seed=4)
    os.symlink("..", root / "loop")
    os.symlink("sub", root / "alias")
    os.symlink("missing.png", root / "gone.png")
    out = tmp_path / "out"
    result = run_cli("--input_dir", root, "--output_dir", out, "--model", tiny_model, "--batch_size", 4,
                     "--num_workers", 0)
    assert result.returncode == 3, result.stderr  # 3: some images failed
    written = sorted(str(path.relative_to(out)) for path in out.rglob("*.pt"))
    assert written == ["00000.pt", "00001.pt", "sub/00000.pt"]
    records = [json.loads(line) for line in (out / "failures.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [record["path"] for record in records] == ["gone.png"]
    assert records[0]["error"] == "FileNotFoundError: dangling symbolic link to 'missing.png'"
    assert result.stderr.count("gone.png") == 1
def test_find_images_never_enters_a_skipped_directory_by_any_name(tmp_path):
    for name in ["a.png", "out/00000.png", "out/sub/b.jpg", "keep/c.png"]:
        touch(tmp_path / name)
    os.symlink("out", tmp_path / "alias")
    assert find_images(tmp_path, skip=[tmp_path / "out"]) == ["a.png", "keep/c.png"]
    assert find_images(tmp_path, skip=[tmp_path / "alias"]) == ["a.png", "keep/c.png"]
    # The input directory itself, or a directory not made yet, skips nothing.
    everything = find_images(tmp_path)
    assert find_images(tmp_path, skip=[tmp_path, tmp_path / "not_yet"]) == everything
    assert "out/00000.png" in everything


def test_an_output_tree_inside_the_input_is_never_read_as_input(tmp_path, tiny_model):
    """The reviewer's steps: extract into in/out, draw a file with pyramid.show (its picture lands beside the
    file, in the output tree), extract again. The picture was read as an image (out/out/00000.pt)."""
    from pyramid import PyramidDataset, show, verify

    root, out = tmp_path / "in", tmp_path / "in" / "out"
    write_images(root, 2)
    command = ["--input_dir", root, "--output_dir", out, "--model", tiny_model, "--num_workers", 0]
    assert run_cli(*command).returncode == 0
    assert show.main(show.get_args_parser().parse_args([str(out / "00000.pt"), "--cell", "16"])) == 0
    assert (out / "00000.png").is_file()

    result = run_cli(*command)
    assert result.returncode == 0, result.stderr
    assert "2 images in" in result.stderr and "done: 0 written, 2 skipped" in result.stderr
    assert "s; nothing encoded)" in result.stderr and "images/s" not in result.stderr
    assert sorted(str(path.relative_to(out)) for path in out.rglob("*.pt")) == ["00000.pt", "00001.pt"]
    assert len(PyramidDataset(out)) == 2
    assert verify.main(verify.get_args_parser().parse_args([str(out), "--input_dir", str(root)])) == 0


def pyramid_file(path, hidden=8):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_atomic({"16x16": torch.randn(1, 256, hidden), "1x1": torch.randn(1, 1, hidden)}, path)
    return path.read_bytes()


def test_find_damaged_outputs_names_exactly_the_broken_files(tmp_path):
    for name in ["a.pt", "s/b.pt", "s/c.pt", "d.pt"]:
        pyramid_file(tmp_path / name, hidden=4 + len(name))  # sizes differ: the footer alone decides
    (tmp_path / "s" / "b.pt").write_bytes(b"")
    (tmp_path / "d.pt").write_bytes((tmp_path / "d.pt").read_bytes()[:100])
    assert find_damaged_outputs(tmp_path, {"a.pt", "s/b.pt", "s/c.pt", "d.pt"}) == {"s/b.pt", "d.pt"}


def test_an_entry_that_is_no_regular_file_is_no_complete_archive_and_never_waited_on(tmp_path):
    real = tmp_path / "real.pt"
    pyramid_file(real)
    hostile_names.fifo(tmp_path / "fifo.pt")  # opened to read without O_NONBLOCK, it would wait for ever
    hostile_names.link(tmp_path / "to_fifo.pt", tmp_path / "fifo.pt")
    hostile_names.link(tmp_path / "to_real.pt", real)
    hostile_names.folder(tmp_path / "folder.pt")
    hostile_names.unix_socket(tmp_path / "socket.pt")
    names = {"real.pt", "fifo.pt", "to_fifo.pt", "to_real.pt", "folder.pt", "socket.pt"}
    assert hostile_names.finishes_within(10, find_damaged_outputs, tmp_path, names) == names - {"real.pt"}


def test_rerun_redoes_exactly_the_files_a_crash_cut_short(tmp_path, tiny_model):
    write_images(tmp_path / "in", 5)
    args = ("--input_dir", tmp_path / "in", "--output_dir", tmp_path / "out", "--model", tiny_model,
            "--num_workers", 0)
    assert run_cli(*args).returncode == 0
    out = tmp_path / "out"
    expected = {name: (out / name).read_bytes() for name in ["00001.pt", "00003.pt"]}
    (out / "00001.pt").write_bytes(b"")  # what a node crash leaves of a file renamed before its data landed
    (out / "00003.pt").write_bytes(expected["00003.pt"][:len(expected["00003.pt"]) // 2])
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.pt")}
    rerun = run_cli(*args)
    assert rerun.returncode == 0, rerun.stderr
    assert "2 file(s) cut short by a crash" in rerun.stderr
    assert [line for line in rerun.stderr.splitlines() if line.startswith("done: ")][0].startswith(
        "done: 2 written, 3 skipped")
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.pt")}
    assert sorted(name for name in after if after[name] != before[name]) == ["00001.pt", "00003.pt"]
    for name, data in expected.items():
        assert (out / name).read_bytes() == data  # the same bytes as the first run wrote
