"""pyramid/recompute.py: verify --recompute on trees the extractor made with the right and with another random
model, its seeded sample, and the relative error it compares files by."""

import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
from test_verify import NAMES, problem_lines, run_verify, verify

from conftest import REPO, run_cli, save_tiny_dinov2, write_images
from pyramid.recompute import RECOMPUTE_TOLERANCE, relative_error, sample_images
from pyramid.synthetic import LEVELS, write_tree
from pyramid.verify import get_args_parser, main

# --- --recompute: files the model did not make -----------------------------------------------------------

RECOMPUTE_IMAGES = 6


@pytest.fixture(scope="module")
def recompute_trees(tmp_path_factory, tiny_model):
    """Images, and their --flip trees made by the extractor with two random tiny models of the same
    architecture: `tiny_model` (seed 0) and another (seed 1)."""
    root = tmp_path_factory.mktemp("recompute")
    images = root / "images"
    write_images(images, RECOMPUTE_IMAGES - 2, size=(64, 48))
    write_images(images / "sub", 2, size=(40, 90), seed=1, suffix=".jpg")
    other_model = save_tiny_dinov2(root / "other_model", seed=1)
    trees = {}
    for name, model in (("right", tiny_model), ("other", other_model)):
        result = run_cli("--input_dir", images, "--output_dir", root / name, "--model", model, "--flip",
                         "--num_workers", 0)
        assert result.returncode == 0, result.stderr
        trees[name] = root / name
    return images, trees


def tree_copy(source, target):
    shutil.copytree(source, target)
    return target


def recompute_lines(lines):
    return [line for line in lines if line.startswith("recompute: ")]


def test_recompute_names_a_file_of_another_model_that_plain_verify_passes(tmp_path, recompute_trees):
    images, trees = recompute_trees
    output = tree_copy(trees["right"], tmp_path / "out")
    shutil.copy(trees["other"] / "00002.pt", output / "00002.pt")  # self-consistent: same shapes, true 2x2 means
    plain = run_verify(output, "--input_dir", images)
    assert plain.returncode == 0, plain.stdout

    result = run_verify(output, "--input_dir", images, "--recompute", 100)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    (line,) = problem_lines(lines, output / "00002.pt")
    assert line.startswith(f"{output / '00002.pt'}: differs from its recomputation beyond the fp32 tolerance "
                           f"{RECOMPUTE_TOLERANCE['fp32']:g} in 10 level(s) (worst "), line
    worst = float(line.split("max|diff|/RMS ")[1].split(")")[0])
    assert worst > 1000 * RECOMPUTE_TOLERANCE["fp32"], line
    assert [line for line in lines if ": differs from its recomputation" in line] == [line]  # the right model's pass
    assert lines[-1].startswith(f"checked {RECOMPUTE_IMAGES} files: {RECOMPUTE_IMAGES - 1} ok, 1 with problems;")
    report = recompute_lines(lines)
    model = json.loads((output / "manifest.json").read_text())["model"]
    assert report[1] == f"recompute: compared {RECOMPUTE_IMAGES} with {model} in fp32 on cpu"
    assert max(level_errors(report[2]).values()) == worst
    assert report[3].startswith(f"recompute: of the {RECOMPUTE_IMAGES - 1} files that agree: ")
    assert max(level_errors(report[3]).values()) <= RECOMPUTE_TOLERANCE["fp32"], report


def level_errors(line):
    """{"16x16": 1.2e-06, ...} from a 'recompute: ...: 16x16 1.2e-06, 8x8 ...[; tolerance ...]' line."""
    listed = line.split(": ", 2)[2].split("; ")[0]
    return {level: float(error) for level, error in (part.split() for part in listed.split(", "))}


def sampled(lines):
    """The images a --recompute run says it sampled, and how many it compared."""
    line = [line for line in recompute_lines(lines) if line.startswith("recompute: sampled ")][0]
    return line.split("): ", 1)[1].split(", ")


def test_recompute_sample_is_seeded_reproducible_and_all_when_n_is_large(tmp_path, capsys, recompute_trees):
    images, trees = recompute_trees
    output = trees["right"]
    status, lines = verify(capsys, output, "--input_dir", images, "--recompute", 2)
    assert status == 0, lines
    first = sampled(lines)
    assert len(first) == 2 and "recompute: compared 2 with" in recompute_lines(lines)[1]
    assert f"recompute: sampled 2 of {RECOMPUTE_IMAGES} images with a file (seed 0): " in recompute_lines(lines)[0]
    assert sampled(verify(capsys, output, "--input_dir", images, "--recompute", 2)[1]) == first
    others = {tuple(sampled(verify(capsys, output, "--input_dir", images, "--recompute", 2, "--seed", seed)[1]))
              for seed in (1, 2, 3)}
    assert others - {tuple(first)}, "the seed changes nothing"
    everything = sorted(str(path.relative_to(images)) for path in images.rglob("*.*"))
    for count in (RECOMPUTE_IMAGES, 1000):
        status, lines = verify(capsys, output, "--input_dir", images, "--recompute", count)
        assert status == 0 and sampled(lines) == everything, lines
        assert recompute_lines(lines)[1].startswith(f"recompute: compared {RECOMPUTE_IMAGES} with ")


def test_recompute_compares_the_flip_twins(tmp_path, capsys, recompute_trees):
    images, trees = recompute_trees
    output = tree_copy(trees["right"], tmp_path / "out")
    status, lines = verify(capsys, output, "--input_dir", images, "--recompute", 100)
    assert status == 0, lines
    assert list(level_errors(recompute_lines(lines)[2])) == LEVELS + [f"flip/{level}" for level in LEVELS]
    # The mirror's levels of another image: a consistent file that plain verify passes.
    pyramid = torch.load(output / "00001.pt", weights_only=True)
    other = torch.load(output / "00000.pt", weights_only=True)
    pyramid.update({key: value for key, value in other.items() if key.startswith("flip/")})
    torch.save(pyramid, output / "00001.pt")
    assert verify(capsys, output, "--input_dir", images)[0] == 0
    status, lines = verify(capsys, output, "--input_dir", images, "--recompute", 100)
    assert status == 1
    (line,) = problem_lines(lines, output / "00001.pt")
    assert "in 5 level(s) (worst flip/" in line, line


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_files_made_in_lower_precision_pass_within_their_dtype_tolerance(tmp_path, capsys, recompute_trees, dtype,
                                                                         tiny_model):
    images, _ = recompute_trees
    result = run_cli("--input_dir", images, "--output_dir", tmp_path / "out", "--model", tiny_model, "--dtype", dtype,
                     "--num_workers", 0)
    assert result.returncode == 0, result.stderr
    status, lines = verify(capsys, tmp_path / "out", "--input_dir", images, "--recompute", 100)
    assert status == 0, lines
    worst = level_errors(recompute_lines(lines)[2])
    assert 0 < max(worst.values()) <= RECOMPUTE_TOLERANCE[dtype], lines  # not an fp32 file: it shows its rounding
    assert recompute_lines(lines)[2].endswith(f"; tolerance for {dtype} files {RECOMPUTE_TOLERANCE[dtype]:g}")


def test_recompute_refuses_what_it_cannot_recompute_as_made(tmp_path, capsys, recompute_trees, tiny_model):
    images, trees = recompute_trees
    output = tree_copy(trees["right"], tmp_path / "out")
    moved = shutil.copytree(tiny_model, tmp_path / "moved_model")
    manifest = json.loads((output / "manifest.json").read_text())
    (output / "manifest.json").unlink()
    status = main(get_args_parser().parse_args([str(output), "--input_dir", str(images), "--recompute", "2"]))
    error = capsys.readouterr().err
    assert status == 2 and error == (f"error: --recompute needs {output / 'manifest.json'}, which names the model and "
                                     f"settings that made the files: there is none\n")
    (output / "manifest.json").write_text(json.dumps({**manifest, "model": str(tmp_path / "gone")}))
    status = main(get_args_parser().parse_args([str(output), "--input_dir", str(images), "--recompute", "2"]))
    error = capsys.readouterr().err
    assert status == 2 and error.startswith("error: --recompute cannot load the model that made the files: "), error
    assert len(error.splitlines()) == 1
    # The same weights elsewhere: --model says where.
    status, lines = verify(capsys, output, "--input_dir", images, "--recompute", 2, "--model", moved)
    assert status == 0, lines
    # Other weights at that path (the other model, re-saved there): refused, naming both digests.
    other = shutil.copytree(trees["other"].parent / "other_model", tmp_path / "other_model")
    status = main(get_args_parser().parse_args([str(output), "--input_dir", str(images), "--recompute", "2",
                                                "--model", str(other)]))
    error = capsys.readouterr().err
    assert status == 2 and error.startswith(f"error: --recompute: the weights of {other} are sha256:"), error
    assert f"the files were made with {manifest['revision']}" in error and len(error.splitlines()) == 1


def test_recompute_without_input_dir_is_a_usage_error_before_torch_loads(tmp_path):
    output = write_tree(tmp_path / "out", NAMES)
    probe = f"""
import sys
sys.path.insert(0, {str(REPO)!r})
from pyramid.verify import get_args_parser, main
status = main(get_args_parser().parse_args([{str(output)!r}, "--recompute", "4"]))
print(status, "torch" in sys.modules)
"""
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["2", "False"], result.stdout + result.stderr
    assert result.stderr.splitlines() == ["error: --recompute needs --input_dir, the images the files were made from"]


def test_relative_error_is_max_abs_difference_over_rms():
    recomputed = torch.tensor([[[3.0, -4.0], [0.0, 0.0]]])  # RMS 2.5
    stored = recomputed + torch.tensor([[[0.0, 0.5], [-1.0, 0.0]]])
    assert relative_error(stored, recomputed) == pytest.approx(1.0 / 2.5)
    assert relative_error(recomputed, recomputed) == 0.0
    assert relative_error(torch.full((1, 2, 2), float("nan")), recomputed) == math.inf
    assert relative_error(torch.ones(1, 2, 2), torch.zeros(1, 2, 2)) == math.inf


def test_sample_images_is_sorted_seeded_and_whole_when_asked_for_more():
    images = [f"{i:03d}.png" for i in range(50)]
    sample = sample_images(reversed(images), 5, seed=0)
    assert sample == sorted(sample) and len(set(sample)) == 5 and set(sample) <= set(images)
    assert sample_images(images, 5, seed=0) == sample != sample_images(images, 5, seed=1)
    assert sample_images(images, 50, seed=0) == sample_images(images, 51, seed=7) == images


def test_relative_error_leaves_out_the_store_rounding_and_nothing_more():
    torch.manual_seed(0)
    recomputed = torch.randn(1, 64, 32) * 10
    recomputed[0, 0, 0] = 1e-6  # a subnormal in fp16
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        stored = recomputed.to(dtype)
        assert relative_error(stored, recomputed) > 0  # the rounding, seen as an error of an fp32 file
        assert relative_error(stored, recomputed, name) == 0.0
        off = stored.clone()
        off[0, 5, 3] += 0.5  # one value off by 0.5 of an RMS of about 10: a wrong value, not rounding
        assert relative_error(off, recomputed, name) > 0.02
