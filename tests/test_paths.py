"""pyramid/paths.py: discovery, output mapping, clashes, temporaries, the to-do list."""

import os
import subprocess
import sys
import time

import pytest
import torch

from conftest import run_cli, write_images
from pyramid.paths import (find_clashes, find_damaged_outputs, find_images, images_to_do, is_abandoned_temporary,
                           is_complete_archive, is_temporary_name, output_path_for, scan_outputs, temporary_name,
                           writer_tag)
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


def pyramid_file(path, hidden=8):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_atomic({"16x16": torch.randn(1, 256, hidden), "1x1": torch.randn(1, 1, hidden)}, path)
    return path.read_bytes()


@pytest.mark.parametrize("keep", [None, 0, 10, 0.5, -1])
def test_a_file_cut_short_is_not_complete(tmp_path, keep):
    data = pyramid_file(tmp_path / "a.pt")
    if keep is not None:
        (tmp_path / "a.pt").write_bytes(data[:int(len(data) * keep) if isinstance(keep, float) else keep])
    assert is_complete_archive(tmp_path / "a.pt") == (keep is None)


def test_a_file_whose_last_blocks_are_zeros_is_not_complete(tmp_path):
    data = pyramid_file(tmp_path / "a.pt")
    (tmp_path / "a.pt").write_bytes(data[:-4096] + bytes(4096))  # size kept, data lost: a crash on ext4
    assert not is_complete_archive(tmp_path / "a.pt")
    assert not is_complete_archive(tmp_path / "missing.pt")


def test_find_damaged_outputs_names_exactly_the_broken_files(tmp_path):
    for name in ["a.pt", "s/b.pt", "s/c.pt", "d.pt"]:
        pyramid_file(tmp_path / name, hidden=4 + len(name))  # sizes differ: the footer alone decides
    (tmp_path / "s" / "b.pt").write_bytes(b"")
    (tmp_path / "d.pt").write_bytes((tmp_path / "d.pt").read_bytes()[:100])
    assert find_damaged_outputs(tmp_path, {"a.pt", "s/b.pt", "s/c.pt", "d.pt"}) == {"s/b.pt", "d.pt"}


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
