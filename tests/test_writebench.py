"""pyramid/writebench.py: the write bound writes real files and cleans up; the regime and the levers (no timing
thresholds)."""

from pathlib import Path

import pytest

from pyramid.writebench import dirty_limit_bytes, measure_write, write_levers, write_regime


@pytest.mark.parametrize("serialise, function", [("layout", "write_atomic"), ("torch.save", "save_atomic")])
def test_write_bound_writes_real_files_and_cleans_up(tmp_path, monkeypatch, serialise, function):
    import pyramid.writer

    written = []
    real = getattr(pyramid.writer, function)
    monkeypatch.setattr(pyramid.writer, function,
                        lambda content, path, **options: (written.append(path), real(content, path, **options)))
    files_per_second, megabytes_per_second, used = measure_write(tmp_path, 8, 4, 3, 7, threads=2, serialise=serialise)
    assert len(written) == 9 and used == serialise  # whole batches: 7 files asked, 3 batches of 3
    file_bytes = 4 * 8 * (16 + 4 + 1)
    assert 0 < files_per_second and megabytes_per_second > files_per_second * file_bytes / 1e6  # + zip overhead
    assert list(tmp_path.iterdir()) == []


def test_write_regime_tells_memory_page_cache_and_disk_apart(tmp_path):
    limit = dirty_limit_bytes()
    assert limit is not None and limit > 0  # Linux: /proc/sys/vm and /proc/meminfo
    assert write_regime(tmp_path, 10**6) == "page cache" or write_regime(tmp_path, 10**6) == "memory (tmpfs)"
    if write_regime(tmp_path, 10**6) == "page cache":
        assert write_regime(tmp_path, 2 * limit) == "disk"
    if Path("/dev/shm").is_dir():
        assert write_regime("/dev/shm", 10**15) == "memory (tmpfs)"


def test_write_levers_measure_both_serialisers_and_the_gil(tmp_path):
    levers = write_levers(tmp_path, 8, 4, 4, 8, (1, 2), rounds=1)
    assert set(levers["files_per_second"]) == {"layout", "torch.save"}
    assert all(set(per) == {"1", "2"} and all(rate > 0 for rate in per.values())
               for per in levers["files_per_second"].values())
    assert all(value is None or value >= 0 for value in levers["gil_ms_per_file"].values())
    assert levers["serialiser"] == "layout" and levers["regime"] in ("page cache", "memory (tmpfs)")
    assert list(tmp_path.iterdir()) == []
