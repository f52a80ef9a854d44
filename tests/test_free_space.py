"""Free space: a run whose files cannot fit on the output disk is refused before it starts (pyramid/loop.py),
from the size a file takes (pyramid/writer.py's estimate), on a real small filesystem."""

import os
import subprocess

import pytest
import torch

from conftest import TINY_HIDDEN, run_cli, write_images
from pyramid.levels import build_pyramid, pyramid_sizes, split_pyramids, split_twins
from pyramid.writer import estimated_file_bytes, save_atomic

DISK_BYTES = 2 * 1024 * 1024


@pytest.mark.parametrize("hidden, flip, store_dtype", [(TINY_HIDDEN, False, "fp32"), (384, True, "fp32"),
                                                      (768, False, "fp32"), (768, True, "fp32"),
                                                      (768, False, "bf16"), (384, True, "fp16")])
def test_the_estimate_is_the_space_a_written_file_takes(tmp_path, hidden, flip, store_dtype):
    levels = build_pyramid(torch.randn(2 if flip else 1, 256, hidden), 16)  # {"16x16": (B, 256, D), ...}
    if flip:
        levels = split_twins(levels)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[store_dtype]
    path = tmp_path / "file.pt"
    save_atomic(split_pyramids({key: value.to(dtype) for key, value in levels.items()})[0], path)
    taken = os.stat(path).st_blocks * 512  # what the file takes on the disk, in whole blocks
    estimate = estimated_file_bytes(pyramid_sizes(16), hidden, flip, store_dtype)
    assert taken <= estimate <= taken + 4096, (taken, estimate)
    if hidden == 768:  # the figures the docs give for dinov2-base
        assert round(estimate / 1e6, 2) == {("fp32", False): 1.05, ("fp32", True): 2.1,
                                            ("bf16", False): 0.53}[store_dtype, flip]


@pytest.fixture
def small_disk(tmp_path):
    """A real 2 MiB filesystem (tmpfs), mounted for the test and unmounted after it."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root and CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_run_that_cannot_fit_is_refused_up_front_unless_told(tmp_path, tiny_model, small_disk):
    # A tiny-model file takes 48 KiB: 60 need 2.9 MB, the disk has 2.1 MB; 30 fit.
    write_images(tmp_path / "in", 60)
    out = small_disk / "out"
    command = ["--input_dir", tmp_path / "in", "--output_dir", out, "--model", tiny_model, "--num_workers", 0]
    result = run_cli(*command)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: the 60 images to do need about 2.9 MB in {out} (49.2 KB a file) and its disk has 2.1 MB free; "
        f"free some space or use another --output_dir (--ignore_free_space starts anyway)"), result.stderr
    assert not out.exists()  # refused before anything was written

    result = run_cli(*command, "--limit", 30)
    assert result.returncode == 0, result.stderr
    assert "30 to do on 1 process(es), about 1.5 MB to write (2.1 MB free there)" in result.stderr
    assert len(list(out.glob("*.pt"))) == 30

    # Told to start anyway, it starts: and the disk fills up part way, as the refusal warned.
    result = run_cli(*command, "--ignore_free_space")
    assert "30 to do on 1 process(es), about 1.5 MB to write" in result.stderr
    assert result.returncode == 1 and "No space left on device" in result.stderr, result.stderr
