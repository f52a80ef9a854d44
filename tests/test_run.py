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


def test_shared_memory_the_decode_workers_need():
    from pyramid.run import shared_memory_needed, shared_memory_warning

    # (15 workers x 2 prefetched + 2 held) batches of 64 uint8 224x224 crops; --flip doubles each batch.
    assert shared_memory_needed(64, 15, 224) == 32 * 64 * 3 * 224 * 224 == 308_281_344
    assert shared_memory_needed(64, 15, 224, flip=True) == 2 * 308_281_344
    assert shared_memory_needed(64, 0, 224) == 0  # no workers: nothing crosses processes
    assert shared_memory_warning(16, 2, 224, shm="/") is None  # plenty of room
    line = shared_memory_warning(10**6, 15, 224, shm="/")  # far more than any disk
    assert line.startswith("warning: / has ") and "15 decode workers at batch 1000000 hold up to " in line
    assert "--shm-size=" in line and "--num_workers" in line and "\n" not in line
