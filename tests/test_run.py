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
