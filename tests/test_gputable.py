"""pyramid/gputable.py: the GPU table and the model rows run on a CPU with tiny counts and report sane figures."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TORCHVISION
from pyramid.bench import get_args_parser, main
from pyramid.gputable import bound_name, format_models_table, measure_model_rows, write_table_inputs


def test_the_bound_is_the_slowest_stage():
    assert bound_name({"decode": 30.0, "model": 10.0, "write": 20.0}) == "model"


def test_table_inputs_are_prepare_sized_pngs(tmp_path):
    directory = write_table_inputs(tmp_path / "in256", 256, count=5, unique=2)
    names = sorted(path.name for path in directory.iterdir())
    assert names == [f"{i:05d}.png" for i in range(5)]
    pixels = [np.asarray(Image.open(directory / name)) for name in names]
    assert all(image.shape == (256, 256, 3) for image in pixels)
    assert np.array_equal(pixels[0], pixels[2]) and not np.array_equal(pixels[0], pixels[1])


def test_gpu_table_runs_on_cpu_with_quick_counts(tmp_path, capsys, monkeypatch):
    # In this process (the end-to-end runs are subprocesses all the same), no decode workers: seconds saved.
    # torch.compile stands aside (compiling takes minutes here): --compile's measuring code still runs.
    monkeypatch.setattr(torch, "compile", lambda model, **options: model)
    args = get_args_parser().parse_args(["--table", "--random", "tiny", "--quick", "--batch_sizes", "4",
                                         "--num_workers", "0", "--compile", "--save", str(tmp_path / "table.json")])
    assert main(args) == 0
    markdown = capsys.readouterr().out
    figures = json.loads((tmp_path / "table.json").read_text())
    assert "| 256x256 PNG | 4 | 16 |" in markdown and "| fp16 | " in markdown
    assert figures["device"] == "cpu" and figures["dtype"] == "fp32" and figures["model"] == "random tiny"
    assert [(row["input"], row["batch_size"], row["images"]) for row in figures["rows"]] == [
        ("1024x1024 PNG", 4, 8), ("256x256 PNG", 4, 16)]
    for row in figures["rows"]:
        rates = {"decode": row["decode_bound"], "model": row["model_bound"], "write": row["write_bound"]}
        assert all(0 < rate < 1e6 for rate in rates.values()) and 0 < row["end_to_end"] < 1e6
        assert row["ideal"] == pytest.approx(1 / (1 / rates["model"] + 1 / rates["decode"]))
        assert row["end_to_end_over_ideal"] == pytest.approx(row["end_to_end"] / row["ideal"])
        assert row["bound"] == min(rates, key=rates.get)
    assert all(row["files_went_to"] in ("page cache", "memory (tmpfs)") for row in figures["rows"])
    assert figures["serialiser"] == "layout" and figures["attention"].startswith("sdpa: ")
    write = figures["write"]
    assert set(write["files_per_second"]) == {"layout", "torch.save"} and write["disk_files_per_second"] > 0
    assert "| layout | " in markdown and "| torch.save | " in markdown and "Disk-bound: " in markdown
    assert figures["compiled"]["model_bound"] > 0 and "--compile: model bound" in markdown
    # 256x256 PNGs decode faster than 1024x1024 ones: the two inputs really differ.
    assert figures["rows"][1]["decode_bound"] > figures["rows"][0]["decode_bound"]
    for dtype in ("fp16", "bf16"):  # computed on CPU here, on the GPU there
        cosines = figures["fidelity"][dtype]
        assert list(cosines) == ["16x16", "8x8", "4x4", "2x2", "1x1"]
        assert all(0.99 < value <= 1.0 + 1e-6 for value in cosines.values()), (dtype, cosines)


def test_model_rows_measure_each_encoder_and_resolution(tmp_path, capsys):
    """--models' rows, at the tiny size: each family and resolution loads and runs with its own grid; a DINOv3
    where torchvision is missing says so instead of a figure."""
    rows = (("dinov2", "tiny", 224), ("dinov2", "tiny", 448), ("dinov3", "tiny", 224), ("dinov3", "tiny", 256))
    figures = measure_model_rows(torch.device("cpu"), "fp32", 2, 4, tmp_path, rows)
    assert [(row["model"], row["resolution"]) for row in figures] == [(f"{f}-{s}", r) for f, s, r in rows]
    assert [row.get("grid") for row in figures[:2]] == [16, 32] and figures[1]["levels"] == 6
    if TORCHVISION:
        assert [(row["grid"], row["levels"]) for row in figures[2:]] == [(14, 2), (16, 5)]
    else:
        assert all("torchvision" in row["skipped"] for row in figures[2:])
    assert all(row["model_bound"] > 0 for row in figures if "skipped" not in row)
    table = format_models_table({"dtype": "fp32", "device_name": "cpu", "batch_size": 2, "images": 4,
                                 "rows": figures})
    assert "| dinov2-tiny | 448 | 32x32 .. 1x1 (6) | " in table
    assert ("| dinov3-tiny | 224 | 14x14 .. 7x7 (2) | " if TORCHVISION else "| dinov3-tiny | 224 | | not measured") \
        in table
    assert main(get_args_parser().parse_args(["--models", "--random", "tiny"])) == 2  # random sizes of its own
    assert "drop --model, --random" in capsys.readouterr().err
