"""pyramid/writer.py: atomic files, the failures record, write errors."""

import json
import os

import pytest
import torch

from pyramid.paths import scan_outputs
from pyramid.pool import build_pyramid
from pyramid.writer import Writer, record_failure, save_atomic


def test_save_atomic_leaves_only_the_final_file(tmp_path):
    save_atomic({"1x1": torch.ones(1, 1, 4)}, tmp_path / "a.pt")
    assert sorted(os.listdir(tmp_path)) == ["a.pt"]
    assert torch.equal(torch.load(tmp_path / "a.pt", weights_only=True)["1x1"], torch.ones(1, 1, 4))


def test_save_atomic_removes_its_temporary_on_error(tmp_path, monkeypatch):
    def failing_replace(source, target):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space"):
        save_atomic({"1x1": torch.ones(1, 1, 4)}, tmp_path / "a.pt")
    assert os.listdir(tmp_path) == []


def test_writer_splits_batches_into_files(tmp_path):
    levels = build_pyramid(torch.randn(3, 16, 5), 4)
    writer = Writer(tmp_path)
    writer.submit_batch(["x/a.pt", "b.pt", "x/y/c.pt"], levels)
    writer.close()
    assert writer.written == 3
    assert scan_outputs(tmp_path) == ({"x/a.pt", "b.pt", "x/y/c.pt"}, [])
    loaded = torch.load(tmp_path / "b.pt", weights_only=True)
    assert list(loaded) == ["4x4", "2x2", "1x1"]
    assert torch.equal(loaded["4x4"][0], levels["4x4"][1])


def test_writer_reports_the_first_error_with_the_path(tmp_path):
    (tmp_path / "blocker").write_text("a file where a directory should be")
    writer = Writer(tmp_path)
    writer.submit_batch(["blocker/a.pt"], build_pyramid(torch.randn(1, 4, 2), 2))
    with pytest.raises(OSError, match="blocker"):
        writer.close()
    assert writer.written == 0


def test_record_failure_appends_json_lines(tmp_path):
    record_failure(tmp_path, "a/b.png", "OSError: truncated")
    record_failure(tmp_path, "c d.jpg", "ValueError: empty file")
    lines = [json.loads(line) for line in (tmp_path / "failures.jsonl").read_text().splitlines()]
    assert lines == [{"path": "a/b.png", "error": "OSError: truncated"},
                     {"path": "c d.jpg", "error": "ValueError: empty file"}]
