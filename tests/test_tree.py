"""pyramid/tree.py: the output tree's names are spelled there alone and never an image's file, one append-a-line
writer serves failures.jsonl and runs.jsonl with valid UTF-8 lines, temporaries fit any name, only regular files
are pyramids."""

import ast
import base64
import json
import multiprocessing
import os
import socket
import subprocess
import time
from pathlib import Path

import hostile_names
import pytest

from pyramid import tree
from pyramid.paths import output_path_for
from pyramid.runs import append_run, read_runs
from pyramid.writer import record_failure

PACKAGE = Path(tree.__file__).parent
NAMES = {tree.MANIFEST_NAME, tree.FAILURES_NAME, tree.RUNS_NAME, tree.STATS_NAME, tree.PACK_RECORD_NAME,
         tree.FLIP_PREFIX, tree.LOCK_NAME}


def code_strings(path):
    """(line, text) of every string in the code of a module (f-strings' literal parts too), docstrings aside."""
    module = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(module)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and node.body
                  and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [(node.lineno, node.value) for node in ast.walk(module)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def names_in(path):
    """The strings of a module's code that spell a name of the tree as code does: without a space (messages and
    help texts, which name them to people, have spaces)."""
    return [(line, text) for line, text in code_strings(path)
            if " " not in text and any(name in text for name in NAMES)]


def test_each_name_of_the_tree_is_spelled_in_tree_py_alone():
    spelled = [f"{path.name}:{line}: {text!r}" for path in sorted(PACKAGE.glob("*.py")) if path.name != "tree.py"
               for line, text in names_in(path)]
    assert not spelled, "\n".join(spelled)
    assert {name for name in NAMES if any(text == name for _, text in names_in(PACKAGE / "tree.py"))} == NAMES


def test_the_checker_sees_a_name_spelled_elsewhere(tmp_path):
    module = tmp_path / "m.py"
    module.write_text('"""stats.pt in a docstring is prose."""\nSTATS = "stats.pt"\nkey = f"flip/{level}"\n'
                      'said = "see stats.pt"\n')
    assert [text for _, text in names_in(module)] == ["stats.pt", "flip/"]


def _append_lines(path, writer, count):
    for number in range(count):
        writer(path, number)


def test_failures_and_runs_lines_from_many_processes_never_interleave(tmp_path):
    long = "x" * 5000  # longer than a pipe's atomic write, as an error message may be
    writers = [(_failure, tmp_path), (_run, tmp_path)] * 2
    processes = [multiprocessing.get_context("fork").Process(target=_append_lines, args=(directory, writer, 200))
                 for writer, directory in writers]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
    failures = [json.loads(line) for line in (tmp_path / tree.FAILURES_NAME).read_text().splitlines()]
    assert len(failures) == 400 and all(entry["error"] == long for entry in failures)
    assert len(read_runs(tmp_path)) == 400


def _failure(directory, number):
    record_failure(directory, f"{number}.png", "x" * 5000)


def _run(directory, number):
    append_run(directory, {"run_id": str(number), "status": 0, "note": "y" * 5000})


def test_a_manifest_from_before_store_dtype_reads_and_compares_as_fp32():
    old = {"model": "m", "dtype": "fp32", "levels": ["2x2", "1x1"], "flip": False}
    assert tree.stored_dtype(old) == "fp32"
    assert tree.stored_dtype({**old, "store_dtype": "bf16"}) == "bf16"
    assert tree.stored_dtype(None) is None
    assert tree.manifest_differences(old, {**old, "store_dtype": "fp32"}) == []
    assert tree.manifest_differences(old, {**old, "store_dtype": "fp16"}) == ["store_dtype: 'fp32' -> 'fp16'"]
    records = [["a.pt", 10, 1]]
    # stats.pt and the pack of an old tree stay current once a run has added "store_dtype": "fp32"
    assert tree.tree_digest(old, records) == tree.tree_digest({**old, "store_dtype": "fp32"}, records)
    assert tree.tree_digest(old, records) != tree.tree_digest({**old, "store_dtype": "bf16"}, records)


def test_a_failure_line_is_valid_utf8_json_whatever_bytes_the_name_holds(tmp_path):
    name = hostile_names.NOT_UTF8_BROKEN  # b"bad\xfe.png"
    record_failure(tmp_path, f"sub/{name}", f"UnidentifiedImageError: cannot identify image file '{name}'")
    record_failure(tmp_path, "plain é.png", "OSError: truncated")
    lines = (tmp_path / tree.FAILURES_NAME).read_bytes().decode("utf-8").splitlines()  # strict: valid UTF-8
    odd, plain = [json.loads(line) for line in lines]
    assert odd["path"] == "sub/bad\\xfe.png" and odd["error"].endswith("'bad\\xfe.png'")
    assert base64.b64decode(odd["path_bytes"]) == b"sub/bad\xfe.png"
    assert plain == {"path": "plain é.png", "error": "OSError: truncated"}  # no path_bytes where the text is exact
    assert [tree.failed_image(record) for record in (odd, plain)] == [f"sub/{name}", "plain é.png"]
    assert tree.failed_image({"path": "x", "path_bytes": "not base64!"}) is None
    assert tree.failed_image(["not", "a", "record"]) is None


def test_a_runs_line_is_valid_utf8_json_whatever_its_strings_hold(tmp_path):
    odd = os.fsdecode(b"in\xff")
    append_run(tmp_path, {"run_id": "r", "status": 1, "settings": {"input_dir": odd, odd: Path(odd)},
                          "error": "lone \ud800 surrogate"})
    line = (tmp_path / tree.RUNS_NAME).read_bytes().decode("utf-8")
    assert json.loads(line)["settings"] == {"input_dir": "in\\xff", "in\\xff": "in\\xff"}
    assert json.loads(line)["error"] == "lone \\ud800 surrogate"


@pytest.mark.parametrize("make", ["fifo", "link", "folder"])
def test_a_jsonl_file_that_is_not_a_regular_file_is_refused_not_followed_or_waited_on(tmp_path, make):
    outside = tmp_path / "outside.jsonl"
    outside.write_text("")
    path = tmp_path / "out" / tree.FAILURES_NAME
    path.parent.mkdir()
    {"fifo": hostile_names.fifo, "folder": hostile_names.folder,
     "link": lambda path: hostile_names.link(path, outside)}[make](path)
    with pytest.raises(OSError, match="not a regular file|Is a directory"):
        hostile_names.finishes_within(10, record_failure, path.parent, "a.png", "broken")
    assert outside.read_text() == ""


def test_a_temporary_fits_name_max_and_is_still_recognised_and_cleaned_up(tmp_path):
    for name in (hostile_names.long_name(250, ".pt"), "é" * 127 + ".pt"):  # 250 and 257 bytes
        tag = f"{socket.gethostname()}@{2**22 + 1}.{2**47}"  # a pid that never runs here
        temporary = tree.temporary_name(tmp_path / name, tag)
        assert len(os.fsencode(temporary.name)) <= tree.NAME_MAX and temporary.parent == tmp_path
        assert temporary.name.endswith(f"{tree.TEMPORARY_MARK}{tag}") and tree.is_temporary_name(temporary.name)
        temporary.write_bytes(b"half a file")  # creatable: the file system takes the name
        assert os.fsencode(temporary.name[1:]).startswith(os.fsencode(name)[:200])
        assert tree.is_abandoned_temporary(temporary)
        assert tree.scan_outputs(tmp_path) == (set(), [str(temporary)])
        tree.remove_abandoned_temporaries([temporary])
        assert list(tmp_path.iterdir()) == []
    short = tree.temporary_name(tmp_path / "a.pt", "h@1.2")
    assert short.name == ".a.pt.tmp.h@1.2"


def test_the_trees_own_names_are_never_an_images_file():
    reserved = [output_path_for(name) for name in hostile_names.TREE_NAMED_IMAGES]
    assert reserved == ["stats.pt", "pack/x.pt", ".x.pt.tmp.foo.pt", "manifest.json/a.pt", ".pyramid.lock.d/a.pt"]
    assert all(tree.reserved_output(relative) for relative in reserved)
    assert "stats.pt" in tree.reserved_output("stats.pt") and "pyramid.stats" in tree.reserved_output("stats.pt")
    assert "pack/" in tree.reserved_output("pack/x.pt")
    assert tree.reserved_output("a/.b.tmp.c/d.pt")  # a folder named like a temporary too
    for outside in ("../x.pt", "a/../../x.pt", "/tmp/x.pt", "a//x.pt", "./x.pt"):
        assert "not be a path inside" in tree.reserved_output(outside), outside
    assert tree.reserved_output("..pt") is None and tree.reserved_output("a/...pt") is None  # odd, but inside
    for name in hostile_names.ORDINARY_IMAGES:
        assert tree.reserved_output(output_path_for(name)) is None, name


def test_only_regular_files_outside_the_trees_own_names_are_pyramids(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "real.pt").write_bytes(b"x")
    root = tmp_path / "out"
    for relative in ("a.pt", "flip/b.pt", "s/c.pt", "stats.pt", "pack/x.pt", "pack/flip/8x8.npy",
                     ".pack.tmp.h@1.1/y.pt", "s/.d.tmp.e/f.pt"):
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(b"x")
    hostile_names.fifo(root / "fifo.pt")
    hostile_names.unix_socket(root / "socket.pt")
    hostile_names.folder(root / "folder.pt")
    hostile_names.link(root / "to_fifo.pt", root / "fifo.pt")
    hostile_names.link(root / "to_file.pt", outside / "real.pt")
    hostile_names.link(root / "linked", outside)
    finished, temporaries = tree.scan_outputs(root)
    assert finished == {"a.pt", "flip/b.pt", "s/c.pt"}
    assert temporaries == []


def test_a_manifest_from_before_dinov3_and_resolution_reads_as_a_dinov2_at_its_crop():
    old = {"model": "m", "crop_size": 224, "grid_size": 16, "flip": False}
    assert (tree.model_family(old), tree.manifest_resolution(old)) == ("dinov2", 224)
    assert tree.manifest_differences(old, {**old, "model_family": "dinov2", "resolution": 224}) == []
    assert tree.manifest_differences(old, {**old, "model_family": "dinov3", "resolution": 224}) == [
        "model_family: 'dinov2' -> 'dinov3'"]
    assert tree.manifest_differences({**old, "resolution": 224}, {**old, "crop_size": 448, "resolution": 448}) == [
        "crop_size: 224 -> 448", "resolution: 224 -> 448"]
    records = [["a.pt", 10, 1]]
    # stats.pt and the pack of an old tree stay current once a run has recorded its family and resolution
    assert tree.tree_digest(old, records) == tree.tree_digest({**old, "model_family": "dinov2", "resolution": 224},
                                                              records)
    assert tree.tree_digest(old, records) != tree.tree_digest({**old, "model_family": "dinov3"}, records)


def test_a_zombie_is_a_dead_process_whose_lock_and_temporaries_are_free():
    """A killed run's orphans wait for PID 1 to reap them, which in a container may be late or never."""
    assert tree.pid_alive(os.getpid())
    child = subprocess.Popen(["true"])
    try:
        deadline = time.monotonic() + 30
        while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert not tree.pid_alive(child.pid)
    finally:
        child.wait()
    assert not tree.pid_alive(child.pid)
