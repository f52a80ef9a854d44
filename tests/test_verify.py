"""pyramid/verify.py: the checks one by one, and the CLI on good and broken trees (--recompute:
test_recompute.py)."""

import json
import sys

import pytest
import torch
import torch.nn.functional as F

import warm
from conftest import REPO, write_images
from pyramid.synthetic import GRID, HIDDEN, LEVELS, make_pyramid, write_tree
from pyramid.verify import check_pyramid, get_args_parser, main, pool_2x2

NAMES = ["00000", "00001", "sub/00002"]


def run_verify(*args):
    """`python -m pyramid.verify ARGS` in a subprocess, as a user runs it."""
    return warm.run([sys.executable, "-m", "pyramid.verify", *map(str, args)],
                    cwd=REPO, capture_output=True, text=True, timeout=120)


def verify(capsys, *args):
    """main() in this process: (exit status, stdout lines)."""
    status = main(get_args_parser().parse_args([str(arg) for arg in args]))
    return status, capsys.readouterr().out.splitlines()


def problem_lines(lines, path):
    return [line for line in lines if line.startswith(f"{path}: ")]


def test_pool_2x2_against_avg_pool2d():
    level = torch.randn(1, 8 * 8, 5)
    grid = level.reshape(1, 8, 8, 5).permute(0, 3, 1, 2)  # (1, D, 8, 8)
    reference = F.avg_pool2d(grid, 2).permute(0, 2, 3, 1).reshape(1, 16, 5)
    assert torch.allclose(pool_2x2(level, 8), reference, atol=1e-6)


def test_check_pyramid_passes_a_good_pyramid():
    assert check_pyramid(make_pyramid(0), LEVELS, HIDDEN) == []


def test_check_pyramid_passes_fp16_values_pooled_another_way():
    # Large fp16-cast values pooled in fp32 by another summation order: rounding must not look like an error.
    torch.manual_seed(0)
    finest = (torch.randn(1, 256, 64) * 300).half().float()
    pyramid, level, side = {}, finest, 16
    while True:
        pyramid[f"{side}x{side}"] = level
        if side == 1:
            break
        grid = level.reshape(1, side, side, 64).permute(0, 3, 1, 2)  # (1, D, s, s)
        side //= 2
        level = F.avg_pool2d(grid, 2).permute(0, 2, 3, 1).reshape(1, side * side, 64).contiguous()
    assert check_pyramid(pyramid, LEVELS, 64) == []
    pyramid["4x4"] = pyramid["4x4"].clone()
    pyramid["4x4"][0, 3, 7] += 0.1  # values ~100: a relative error of ~1e-3, far above fp32 rounding
    problems = check_pyramid(pyramid, LEVELS, 64)
    assert [problem.split(" (")[0] for problem in problems] == [
        "4x4 is not the 2x2 mean of 8x8", "2x2 is not the 2x2 mean of 4x4"], problems


@pytest.mark.parametrize("damage, expected", [
    (lambda p: p.pop("2x2"), "missing level(s) ['2x2']"),
    (lambda p: p.update(extra=torch.zeros(1)), "unexpected key(s) ['extra']"),
    (lambda p: p.update({"8x8": p["8x8"][:, :60]}), "8x8 has shape [1, 60, 8], expected [1, 64, 8]"),
    (lambda p: p.update({"4x4": p["4x4"].double()}), "4x4 is torch.float64, expected torch.float32"),
    (lambda p: p["16x16"].__setitem__((0, 5, 2), float("nan")), "16x16 has 1 non-finite value(s)"),
    (lambda p: p.update({"1x1": p["1x1"] + 0.1}), "1x1 is not the 2x2 mean of 2x2"),
    (lambda p: p.update({"8x8": make_pyramid(99)["8x8"]}), "8x8 is not the 2x2 mean of 16x16"),
    (lambda p: p.update({"4x4": p["4x4"].reshape(1, 4, 4, 8).transpose(1, 2).reshape(1, 16, 8)}),
     "4x4 is not the 2x2 mean of 8x8"),
])
def test_check_pyramid_names_each_damage(damage, expected):
    pyramid = make_pyramid(0)
    damage(pyramid)
    problems = check_pyramid(pyramid, LEVELS, HIDDEN)
    assert any(problem.startswith(expected) for problem in problems), problems


def test_check_pyramid_catches_a_mixed_file_only_at_the_seam():
    # 16x16 and 8x8 of one image, the rest of another: a torn or mixed write.
    pyramid = {**make_pyramid(1), "16x16": make_pyramid(0)["16x16"], "8x8": make_pyramid(0)["8x8"]}
    problems = check_pyramid(pyramid, LEVELS, HIDDEN)
    assert [problem.split(" (")[0] for problem in problems] == ["4x4 is not the 2x2 mean of 8x8"], problems


def test_check_pyramid_catches_views_of_a_larger_storage(tmp_path):
    whole = torch.randn(1, 2 * 256, HIDDEN)
    pyramid = make_pyramid(0)
    pyramid["16x16"] = whole[:, :256]
    torch.save(pyramid, tmp_path / "a.pt")
    loaded = torch.load(tmp_path / "a.pt", weights_only=True)
    problems = check_pyramid(loaded, LEVELS, HIDDEN)
    assert any(problem.startswith("16x16 shares a larger storage") for problem in problems), problems


def test_check_pyramid_not_a_dict():
    assert check_pyramid([torch.zeros(1)], LEVELS, HIDDEN) == ["holds a list, not a dict of tensors"]


def test_cli_passes_a_good_tree(tmp_path):
    images = tmp_path / "images"
    write_images(images, 2, size=(8, 8))
    write_images(images / "sub", 1, size=(8, 8), suffix=".JPG", names=["00002.JPG"])
    output = write_tree(tmp_path / "out", NAMES)
    (output / "failures.jsonl").write_text("")
    result = run_verify(output, "--input_dir", images)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == [
        "checked 3 files: 3 ok, 0 with problems; 0 images without a file; 0 leftover temporaries; "
        "0 recorded failures; 0 problems in all"]


def test_cli_names_every_problem_one_per_line(tmp_path):
    images = tmp_path / "images"
    write_images(images, 5, size=(8, 8))  # 00000..00004.png
    output = write_tree(tmp_path / "out", ["00000", "00001", "00002", "00003", "orphan"])
    truncated = output / "00000.pt"
    truncated.write_bytes(truncated.read_bytes()[:1000])
    wrong_shape = make_pyramid(1)
    wrong_shape["2x2"] = wrong_shape["2x2"][:, :, :4]
    torch.save(wrong_shape, output / "00001.pt")
    with_nan = make_pyramid(2)
    with_nan["8x8"][0, 0, 0] = float("nan")
    torch.save(with_nan, output / "00002.pt")
    (output / ".00004.pt.tmp.1234").write_bytes(b"partial")
    (output / "failures.jsonl").write_text(json.dumps({"path": "00004.png", "error": "cannot identify image"}) + "\n")

    result = run_verify(output, "--input_dir", images)
    lines = result.stdout.splitlines()
    assert result.returncode == 1
    assert len(problem_lines(lines, output / "00000.pt")) == 1
    assert problem_lines(lines, output / "00000.pt")[0].startswith(f"{output / '00000.pt'}: cannot be loaded (")
    assert problem_lines(lines, output / "00001.pt") == [
        f"{output / '00001.pt'}: 2x2 has shape [1, 4, 4], expected [1, 4, 8]"]
    assert problem_lines(lines, output / "00002.pt") == [f"{output / '00002.pt'}: 8x8 has 1 non-finite value(s)"]
    assert problem_lines(lines, output / "00003.pt") == []
    assert problem_lines(lines, images / "00004.png") == [
        f"{images / '00004.png'}: no output file {output / '00004.pt'}"]
    assert problem_lines(lines, output / "orphan.pt") == [f"{output / 'orphan.pt'}: no image for this file"]
    assert problem_lines(lines, output / ".00004.pt.tmp.1234") == [
        f"{output / '.00004.pt.tmp.1234'}: leftover temporary file"]
    assert "1 image(s) recorded as failed in failures.jsonl:" in lines
    assert "  00004.png: cannot identify image" in lines
    assert lines[-1] == ("checked 5 files: 1 ok, 4 with problems; 1 image without a file; "
                         "1 leftover temporary; 1 recorded failure; 6 problems in all")


def test_recorded_failures_alone_are_not_problems(tmp_path, capsys):
    output = write_tree(tmp_path / "out", NAMES)
    (output / "failures.jsonl").write_text(json.dumps({"path": "bad.png", "error": "truncated"}) + "\n")
    status, lines = verify(capsys, output)
    assert status == 0
    assert lines[-2:] == ["  bad.png: truncated", "checked 3 files: 3 ok, 0 with problems; 0 leftover temporaries; "
                                                  "1 recorded failure; 0 problems in all"]


def test_the_summary_counts_one_as_one(tmp_path, capsys):
    output = write_tree(tmp_path / "out", ["only"])
    (output / "only.pt").write_bytes(b"torn")
    status, lines = verify(capsys, output)
    assert status == 1
    assert lines[-1] == ("checked 1 file: 0 ok, 1 with problems; 0 leftover temporaries; 0 recorded failures; "
                         "1 problem in all")


def test_a_file_that_disagrees_with_the_manifest(tmp_path, capsys):
    output = write_tree(tmp_path / "out", NAMES)
    torch.save(make_pyramid(5, hidden=HIDDEN * 2), output / "00001.pt")
    status, lines = verify(capsys, output)
    assert status == 1
    assert problem_lines(lines, output / "00001.pt")[0] == (
        f"{output / '00001.pt'}: 16x16 has shape [1, 256, 16], expected [1, 256, 8]")


def test_without_manifest_each_file_is_still_checked(tmp_path, capsys):
    output = write_tree(tmp_path / "out", [f"{i:05d}" for i in range(4)], with_manifest=False)
    torch.save(make_pyramid(5, grid=GRID * 2), output / "00001.pt")  # self-consistent, but a 32x32 grid
    broken = make_pyramid(6)
    broken["1x1"] = broken["1x1"] * 2
    torch.save(broken, output / "00002.pt")
    status, lines = verify(capsys, output)
    assert status == 1
    assert problem_lines(lines, output / "manifest.json") == [
        f"{output / 'manifest.json'}: missing; each file is checked against its own levels and the other files instead"]
    assert problem_lines(lines, output / "00001.pt") == [
        f"{output / '00001.pt'}: has levels ['32x32', '16x16', '8x8', '4x4', '2x2', '1x1'] and D=8, "
        f"most files have {LEVELS} and D=8"]
    assert problem_lines(lines, output / "00002.pt")[0].startswith(
        f"{output / '00002.pt'}: 1x1 is not the 2x2 mean of 2x2")
    assert problem_lines(lines, output / "00000.pt") == problem_lines(lines, output / "00003.pt") == []


def test_a_manifest_with_inconsistent_levels(tmp_path, capsys):
    output = write_tree(tmp_path / "out", NAMES)
    manifest = json.loads((output / "manifest.json").read_text())
    manifest["levels"] = ["16x16", "8x8"]
    (output / "manifest.json").write_text(json.dumps(manifest))
    status, lines = verify(capsys, output)
    assert status == 1
    assert problem_lines(lines, output / "manifest.json") == [
        f"{output / 'manifest.json'}: levels are ['16x16', '8x8'], expected {LEVELS} for grid_size 16"]


def test_a_manifest_whose_resolution_or_family_does_not_fit(tmp_path, capsys):
    output = write_tree(tmp_path / "out", NAMES)
    manifest = json.loads((output / "manifest.json").read_text())
    (output / "manifest.json").write_text(json.dumps({**manifest, "resolution": 448, "model_family": "dinov9"}))
    status, lines = verify(capsys, output)
    assert status == 1
    assert problem_lines(lines, output / "manifest.json") == [
        f"{output / 'manifest.json'}: model_family is 'dinov9', not one of dinov2, dinov3",
        f"{output / 'manifest.json'}: resolution is 448, but grid_size 16 x patch_size 14 is 224"]


@pytest.mark.parametrize("args, message", [
    (["{tmp}/nowhere"], "error: {tmp}/nowhere is not a directory; pass the extractor's --output_dir"),
    (["{tmp}", "--input_dir", "{tmp}/nowhere"], "error: --input_dir {tmp}/nowhere is not a directory"),
    (["{tmp}", "--workers", "0"], "error: --workers must be at least 1, not 0"),
])
def test_bad_arguments_exit_2(tmp_path, capsys, args, message):
    assert main(get_args_parser().parse_args([arg.format(tmp=tmp_path) for arg in args])) == 2
    assert capsys.readouterr().err.startswith(message.format(tmp=tmp_path))


def test_check_pyramid_checks_flip_levels_like_the_others():
    flipped = {f"flip/{level}": tensor for level, tensor in make_pyramid(1).items()}
    pyramid = {**make_pyramid(0), **flipped}
    levels = LEVELS + [f"flip/{level}" for level in LEVELS]
    assert check_pyramid(pyramid, levels, HIDDEN) == []
    assert check_pyramid(make_pyramid(0), levels, HIDDEN) == [f"missing level(s) {levels[5:]}"]
    assert check_pyramid(pyramid, LEVELS, HIDDEN) == [f"unexpected key(s) {levels[5:]}"]
    pyramid["flip/4x4"] = pyramid["flip/4x4"] + 0.1
    problems = [problem.split(" (")[0] for problem in check_pyramid(pyramid, levels, HIDDEN)]
    assert problems == ["flip/4x4 is not the 2x2 mean of flip/8x8", "flip/2x2 is not the 2x2 mean of flip/4x4"]


@pytest.mark.parametrize("name, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_a_pyramid_rounded_once_into_its_store_dtype_passes_and_a_wrong_level_does_not(name, dtype):
    from pyramid.levels import build_pyramid, stored_levels

    torch.manual_seed(0)
    finest = torch.randn(1, 256, 64) * torch.logspace(-3, 3, 64)  # channels from 1e-3 to 1e3, like outliers
    pyramid = stored_levels(build_pyramid(finest, 16), dtype)
    assert check_pyramid(pyramid, LEVELS, 64, name) == []
    assert check_pyramid(pyramid, LEVELS, 64) == [f"{level} is {dtype}, expected torch.float32 (store_dtype fp32)"
                                                  for level in LEVELS]
    pyramid["4x4"] = pyramid["4x4"].clone()
    pyramid["4x4"][0, 3, 60] *= 1.05  # a wrong value, 5 % off: well beyond two roundings of either dtype
    problems = check_pyramid(pyramid, LEVELS, 64, name)
    assert [problem.split(" (")[0] for problem in problems] == [
        "4x4 is not the 2x2 mean of 8x8", "2x2 is not the 2x2 mean of 4x4"], problems
