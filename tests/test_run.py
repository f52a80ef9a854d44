"""pyramid/run.py helpers that need no model: the failures record between runs, default sizes."""

import json

import torch

from pyramid.run import default_batch_size, default_num_workers, prune_failures
from pyramid.writer import FAILURES_NAME, record_failure


def test_prune_failures_keeps_others_and_drops_retried_and_torn_lines(tmp_path):
    record_failure(tmp_path, "a.png", "OSError: truncated")
    record_failure(tmp_path, "b.png", "ValueError: empty file")
    with open(tmp_path / FAILURES_NAME, "a") as file:
        file.write('{"path": "c.pn')  # a line torn by a kill
    prune_failures(tmp_path, {"a.png"})
    lines = (tmp_path / FAILURES_NAME).read_text().splitlines()
    assert [json.loads(line)["path"] for line in lines] == ["b.png"]
    prune_failures(tmp_path, {"b.png"})
    assert not (tmp_path / FAILURES_NAME).exists()


def test_defaults_follow_the_device(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert default_batch_size(torch.device("cuda")) == 64 and default_batch_size(torch.device("cpu")) == 16
    cpu_workers = default_num_workers(torch.device("cpu"))
    assert cpu_workers >= 1
    assert default_num_workers(torch.device("cuda")) == max(1, min(16, cpu_workers - 1))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "64")  # more processes than cores: never zero workers
    assert default_num_workers(torch.device("cpu")) == 1


def test_the_summary_of_a_run_with_nothing_to_encode_gives_no_rate(tmp_path, capsys):
    from pyramid.run import _print_summary

    _print_summary(0, 64, 0, 3.2, 0.0, tmp_path / FAILURES_NAME, False, [0])
    assert capsys.readouterr().err == ("done: 0 written, 64 skipped (already there), 0 failed in 0:00:03 "
                                       "(3.2 s; nothing encoded)\n")
    _print_summary(10, 0, 0, 4.0, 2.0, tmp_path / FAILURES_NAME, False, [6, 4])
    assert capsys.readouterr().err == ("done: 10 written, 0 skipped (already there), 0 failed in 0:00:04 (4.0 s; "
                                       "5.00 images/s while encoding); per process: 6, 4\n")
