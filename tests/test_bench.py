"""pyramid/bench.py: the benchmark runs on a tiny model and reports sane figures (no timing thresholds)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO
from pyramid.bench import ideal_rate, write_synthetic_faces


def test_ideal_rate_overlaps_on_gpu_and_adds_up_on_cpu():
    assert ideal_rate(100.0, 25.0, torch.device("cuda")) == 25.0
    assert ideal_rate(100.0, 25.0, torch.device("cpu")) == pytest.approx(20.0)


def test_synthetic_faces_are_real_looking_pngs(tmp_path):
    paths = sorted(write_synthetic_faces(tmp_path, 2, side=128).iterdir())
    first, second = (np.asarray(Image.open(path)) for path in paths)
    assert first.shape == (128, 128, 3) and first.std() > 20
    assert not np.array_equal(first, second)


def test_bench_reports_positive_consistent_figures():
    result = subprocess.run(
        [sys.executable, "-m", "pyramid.bench", "--random", "tiny", "--synthetic", "8", "--batch_size", "4",
         "--num_workers", "1", "--baseline", "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert figures["images"] == 8 and figures["device"] == "cpu" and figures["dtype"] == "fp32"
    for name in ("decode_bound", "model_bound", "end_to_end", "baseline", "ideal"):
        assert 0 < figures[name] < 1e6, name
    assert figures["end_to_end_over_ideal"] == pytest.approx(figures["end_to_end"] / figures["ideal"])
    assert figures["end_to_end_over_baseline"] == pytest.approx(figures["end_to_end"] / figures["baseline"])
    assert figures["ideal"] < min(figures["decode_bound"], figures["model_bound"])
    assert 50 < figures["peak_rss_mib"] < 8192
    assert figures["min_cosine_vs_baseline"] >= 0.9999  # our files equal the straightforward computation


def test_reader_figures_side_by_side_on_a_synthetic_tree():
    result = subprocess.run(
        [sys.executable, "-m", "pyramid.bench", "--reader", "--synthetic_tree", "12", "--reader_items", "12",
         "--rounds", "1", "--num_workers", "0", "--batch_size", "4", "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert figures["files"] == 12 and figures["levels"] == 5 and 1.0 < figures["file_mb"] < 1.1
    assert 1.0 < figures["pack_gb"] * 1000 / 12 < 1.1  # the pack takes what the files take
    rows = figures["rows"]
    assert {"raw read(), files", "torch.load, files", "PyramidDataset before (mmap + clone)", "PyramidDataset, files",
            "raw pread(), pack rows", "PyramidDataset, pack"} <= set(rows)
    for name, (rate, size) in rows.items():
        assert 0 < rate < 1e7 and 1.0e6 < size < 1.1e6, name
