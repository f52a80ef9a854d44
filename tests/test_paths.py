"""pyramid/paths.py: discovery, output mapping, clashes, temporaries, the to-do list."""

import os
import subprocess
import sys
import time

from pyramid.paths import (find_clashes, find_images, images_to_do, is_abandoned_temporary, is_temporary_name,
                           output_path_for, scan_outputs, temporary_name, writer_tag)


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
