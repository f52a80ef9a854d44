"""pyramid/tree.py: the output tree's names are spelled there alone, and one append-a-line writer serves
failures.jsonl and runs.jsonl."""

import ast
import json
import multiprocessing
from pathlib import Path

from pyramid import tree
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
