"""--store_dtype end to end: bf16 and fp16 trees made by the real extractor, each the fp32 tree rounded once, and
every tool and the training reader on them (verify, --recompute, stats, pack, the dataset and its loader)."""

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_loop import save_overflowing_dinov2, write_trigger_images

from conftest import run_cli
from pyramid import pack, verify
from pyramid.dataset import PyramidDataset
from pyramid.exits import UsageError
from pyramid.reader import read_pyramid
from pyramid.stats import compute_stats
from pyramid.tree import FAILURES_NAME, MANIFEST_NAME, RUNS_NAME, read_manifest, scan_outputs

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
KINDS = ["dark", "left", "right", "white", "dark", "dark"]
BEYOND_FP16 = ["01_left.png", "03_white.png"]  # their features reach 7.8e4 in one channel: finite in fp32 and bf16


def save_fp16_overflowing_dinov2(directory):
    """A tiny DINOv2 whose features are finite in fp32 but beyond fp16's 65504 for images with a white region
    on their left (test_loop's trigger), and about 2.7e3 at most for the others.

    The trigger's MLP unit writes 56 * 1000 into channel 1 of the residual stream alone, which then dominates
    that patch's final LayerNorm (channel 1 about 5.57, the most one of 32 channels can reach); its weight of
    14000 there makes that 7.8e4. Other patches are dominated by channel 0 (the trigger's input), so their
    channel 1 stays small."""
    from transformers import Dinov2Model

    save_overflowing_dinov2(directory, amplification=0.0)
    model = Dinov2Model.from_pretrained(directory)
    with torch.no_grad():
        fc2 = model.encoder.layer[0].mlp.fc2
        fc2.weight[:, 0] = 0
        fc2.weight[1, 0] = 1000
        model.layernorm.weight[1] = 14000
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    """One extractor run per stored dtype over the same six images, two of them beyond fp16's range."""
    root = tmp_path_factory.mktemp("store_dtype")
    model = save_fp16_overflowing_dinov2(root / "model")
    images = write_trigger_images(root / "in", KINDS)
    fitting = root / "in_fp16"  # the images whose features fit fp16: what the fp16 tree can be verified against
    fitting.mkdir()
    for path in sorted(images.iterdir()):
        if path.name not in BEYOND_FP16:
            shutil.copy(path, fitting)
    runs = {}
    for name in ("fp32", "bf16", "fp16"):
        runs[name] = run_cli("--input_dir", images, "--output_dir", root / name, "--model", model,
                             "--batch_size", 4, "--num_workers", 0, "--store_dtype", name)
    return SimpleNamespace(root=root, model=model, images=images, fitting=fitting, runs=runs)


def loaded(path):
    return torch.load(path, weights_only=True)


def files(tree):
    return sorted(scan_outputs(tree)[0])


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_files_are_the_fp32_files_rounded_once(trees, name):
    dtype = DTYPES[name]
    result = trees.runs[name]
    fp32 = trees.root / "fp32"
    assert trees.runs["fp32"].returncode == 0, trees.runs["fp32"].stderr
    assert result.returncode == (3 if name == "fp16" else 0), result.stderr
    tree = trees.root / name
    expected = [relative for relative in files(fp32) if name != "fp16" or relative[:-3] + ".png" not in BEYOND_FP16]
    assert files(tree) == expected and len(expected) == (4 if name == "fp16" else 6)
    for relative in expected:
        stored, reference = loaded(tree / relative), loaded(fp32 / relative)
        assert list(stored) == list(reference)
        for key, value in stored.items():
            assert value.dtype == dtype and value.shape == reference[key].shape and value.is_contiguous()
            assert value.untyped_storage().nbytes() == value.numel() * 2  # its own storage, 2 bytes a value
            assert torch.equal(value, reference[key].to(dtype)), (relative, key)  # round to nearest even, once
        assert (tree / relative).stat().st_size < 0.55 * (fp32 / relative).stat().st_size
    assert read_manifest(tree)["store_dtype"] == name and read_manifest(fp32)["store_dtype"] == "fp32"
    record = json.loads((tree / RUNS_NAME).read_text().splitlines()[-1])
    assert record["settings"]["store_dtype"] == name


def test_a_value_beyond_fp16_is_a_recorded_failure_that_says_what_to_store(trees):
    fp16 = trees.root / "fp16"
    failures = [json.loads(line) for line in (fp16 / FAILURES_NAME).read_text().splitlines()]
    message = ("features of the image beyond the range of --store_dtype fp16 (|x| > 65504): finite in fp32, inf "
               "once stored; no file written: store this tree in bf16 or fp32 (--store_dtype bf16 with another "
               "--output_dir, or with --overwrite)")
    assert failures == [{"path": image, "error": message} for image in BEYOND_FP16]
    assert f"failed: 01_left.png: {message}" in trees.runs["fp16"].stderr.splitlines()
    record = json.loads((fp16 / RUNS_NAME).read_text().splitlines()[-1])
    assert (record["status"], record["written"], record["failed"]) == (3, 4, 2)
    assert not (trees.root / "bf16" / FAILURES_NAME).exists()  # bf16 has fp32's range
    assert loaded(trees.root / "fp32" / "01_left.pt")["16x16"].abs().max() > 65504


def run_verify(*argv):
    return verify.main(verify.get_args_parser().parse_args([str(arg) for arg in argv]))


def save_other_models_file(tiny_model, images, image, path, dtype):
    """The file another model (the suite's tiny DINOv2) makes of `image`, rounded into `dtype`, at `path`."""
    from pyramid.decode import Preprocess, image_loader
    from pyramid.encoder import Encoder, load_model_info
    from pyramid.levels import build_pyramid, split_pyramids, stored_levels
    from pyramid.writer import save_atomic

    info, processor = load_model_info(tiny_model)
    preprocess = Preprocess(processor)
    encoder = Encoder(info, preprocess.normaliser(torch.device("cpu")), torch.device("cpu"), "fp32")
    (_, pixels, _), = list(image_loader(images, [image], preprocess, 1, num_workers=0))
    levels = stored_levels(build_pyramid(encoder(pixels), info.grid_size), dtype)
    save_atomic(split_pyramids(levels)[0], path)


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_verify_and_recompute_pass_and_still_catch_a_file_of_another_model(trees, name, tmp_path, capsys,
                                                                           tiny_model):
    images = trees.fitting if name == "fp16" else trees.images
    tree = trees.root / name
    assert run_verify(tree, "--input_dir", images, "--recompute", 6) == 0
    said = capsys.readouterr().out
    assert f"(beyond the {name} store's rounding, 2**{-8 if name == 'bf16' else -11} of each value)" in said
    assert "; 0 problems in all" in said

    copy = tmp_path / name
    shutil.copytree(tree, copy)
    save_other_models_file(tiny_model, images, "00_dark.png", copy / "00_dark.pt", DTYPES[name])
    assert run_verify(copy) == 0  # a sound pyramid in the right dtype: only recomputing tells
    capsys.readouterr()
    assert run_verify(copy, "--input_dir", images, "--recompute", 6) == verify.PROBLEMS_FOUND
    problems = [line for line in capsys.readouterr().out.splitlines() if "differs from its recomputation" in line]
    assert [line.split(": ")[0] for line in problems] == [str(copy / "00_dark.pt")]

    # A file of another dtype than the manifest's is named.
    shutil.copy(trees.root / "fp32" / "02_right.pt", copy / "02_right.pt")
    assert run_verify(copy) == verify.PROBLEMS_FOUND
    assert f"{copy / '02_right.pt'}: 16x16 is torch.float32, expected {DTYPES[name]} (store_dtype {name})" \
        in capsys.readouterr().out.splitlines()


def test_stats_are_exact_float64_of_the_stored_values_from_files_and_pack(trees, tmp_path):
    tree = tmp_path / "bf16"
    shutil.copytree(trees.root / "bf16", tree)
    stats = compute_stats(tree, workers=1, use_pack=False)
    names = files(tree)
    for level in read_manifest(tree)["levels"]:
        values = np.stack([loaded(tree / relative)[level][0].double().numpy() for relative in names])  # (N, s*s, D)
        expected = {"mean": values.mean(axis=(0, 1)), "std": values.std(axis=(0, 1)),
                    "position_mean": values.mean(axis=0), "position_std": values.std(axis=0)}
        for key, reference in expected.items():
            assert stats[level][key].dtype == torch.float64
            np.testing.assert_allclose(stats[level][key].numpy(), reference, rtol=1e-12, atol=1e-9, err_msg=key)
    fp32_stats = compute_stats(trees.root / "fp32", workers=1, use_pack=False)
    assert not torch.equal(stats["16x16"]["mean"], fp32_stats["16x16"]["mean"])  # the stored values, not fp32's
    assert pack.main(pack.get_args_parser().parse_args([str(tree)])) == 0
    for workers, use_pack in ((3, False), (2, True)):
        again = compute_stats(tree, workers=workers, use_pack=use_pack)
        assert again["source"]["read_from"] == ("pack" if use_pack else "files")
        for level in read_manifest(tree)["levels"]:
            assert all(torch.equal(again[level][key], stats[level][key]) for key in stats[level]), (workers, level)


def stacked_items(dataset, indices):
    return {level: torch.stack([dataset[index][level] for index in indices]) for level in dataset.levels}


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_pack_reader_and_loader_serve_the_files_values_in_their_dtype_or_float32(trees, name, tmp_path):
    dtype = DTYPES[name]
    tree = tmp_path / name
    shutil.copytree(trees.root / name, tree)
    names = files(tree)
    stored = {relative: loaded(tree / relative) for relative in names}
    for relative in names:  # the reader parses the bytes itself: the same values and dtype as torch.load
        read, _ = read_pyramid(tree / relative)
        assert all(read[key].dtype == dtype and torch.equal(read[key], value)
                   for key, value in stored[relative].items())

    assert pack.main(pack.get_args_parser().parse_args([str(tree)])) == 0
    record = json.loads((tree / "pack" / "pack.json").read_text())
    assert record["dtype"] == name
    array = np.load(tree / "pack" / "16x16.npy", mmap_mode="r")
    assert array.dtype == (np.uint16 if name == "bf16" else np.float16)  # numpy has no bfloat16: its raw bits
    assert run_verify(tree) == 0  # every file equals its rows in the pack

    levels = read_manifest(tree)["levels"]
    from_files = PyramidDataset(tree, pack=False)
    from_pack = PyramidDataset(tree, pack=True)
    preloaded = PyramidDataset(tree, preload="cpu")
    assert (from_files.source, from_pack.source, preloaded.source) == ("files", "pack", "preload")
    for dataset in (from_files, from_pack, preloaded):
        assert dataset.stored_dtype == dtype and dataset.dtype == dtype
        for index, relative in enumerate(names):
            item = dataset[index]
            for level in levels:
                assert item[level].dtype == dtype and torch.equal(item[level], stored[relative][level][0])
        batches = list(dataset.loader(3, shuffle=True, seed=1))
        widened = list(dataset.loader(3, shuffle=True, seed=1, dtype=torch.float32))
        copied = list(dataset.loader(3, shuffle=True, seed=1, device="cpu", dtype=torch.float32))  # the copier's
        order = dataset.loader(3, shuffle=True, seed=1).plan(0)[0]
        for number, (batch, wide, copy) in enumerate(zip(batches, widened, copied, strict=True)):
            expected = stacked_items(from_files, order[3 * number:3 * number + 3].tolist())
            for level in levels:
                assert batch[level].dtype == dtype and torch.equal(batch[level], expected[level]), dataset.source
                assert wide[level].dtype == torch.float32 and torch.equal(wide[level], expected[level].float())
                assert copy[level].dtype == torch.float32 and torch.equal(copy[level], expected[level].float())
            del batch, wide, copy
        del batches, widened, copied
        collated = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=PyramidDataset.collate)
        first = next(iter(collated))["16x16"]
        assert first.dtype == dtype and torch.equal(first, stacked_items(from_files, range(4))["16x16"])
    with pytest.raises(ValueError, match="dtype must be"):
        from_files.loader(3, dtype=torch.float64)
    record["dtype"] = "fp32"  # a pack.json that disagrees with the manifest: named, never compared as float32
    (tree / "pack" / "pack.json").write_text(json.dumps(record))
    assert run_verify(tree) == verify.PROBLEMS_FOUND


def test_normalised_items_and_batches_are_float32_from_a_bf16_tree(trees, tmp_path):
    tree = tmp_path / "bf16"
    shutil.copytree(trees.root / "bf16", tree)
    from pyramid import stats as stats_tool

    assert stats_tool.main(stats_tool.get_args_parser().parse_args([str(tree)])) == 0
    dataset = PyramidDataset(tree, levels=["4x4", "1x1"], normalize=True)
    plain = PyramidDataset(tree, levels=["4x4", "1x1"])
    statistics = torch.load(tree / "stats.pt", weights_only=True)
    assert dataset.dtype == torch.float32 and dataset.stored_dtype == torch.bfloat16
    for index in range(len(dataset)):
        for level in dataset.levels:
            expected = (plain[index][level].double() - statistics[level]["mean"]) / statistics[level]["std"]
            assert dataset[index][level].dtype == torch.float32
            torch.testing.assert_close(dataset[index][level].double(), expected, rtol=1e-5, atol=1e-5)
    batch, = list(dataset.loader(6))
    assert all(torch.equal(batch[level], stacked_items(dataset, range(6))[level]) for level in dataset.levels)
    rounded, = list(dataset.loader(6, dtype=torch.bfloat16))
    assert all(torch.equal(rounded[level], batch[level].to(torch.bfloat16)) for level in dataset.levels)


def test_a_rerun_with_another_store_dtype_is_refused_and_the_same_one_resumes(trees, tmp_path):
    from pyramid.decode import pixel_pipeline
    from pyramid.encoder import load_model_info
    from pyramid.plan import plan_run
    from pyramid.settings import Settings

    tree = tmp_path / "bf16"
    shutil.copytree(trees.root / "bf16", tree)
    info, processor = load_model_info(trees.model)
    manifest_before = (tree / MANIFEST_NAME).read_text()
    for other in ("fp32", "fp16"):
        settings = Settings(input_dir=str(trees.images), output_dir=str(tree), model=str(trees.model),
                            store_dtype=other)
        with pytest.raises(UsageError, match=f"other settings \\(store_dtype: 'bf16' -> '{other}'\\); use another "
                                             f"--output_dir, or --overwrite"):
            plan_run(settings, info, "fp32", pixels=pixel_pipeline(processor))
    assert (tree / MANIFEST_NAME).read_text() == manifest_before and len(files(tree)) == 6
    same = Settings(input_dir=str(trees.images), output_dir=str(tree), model=str(trees.model), store_dtype="bf16")
    assert plan_run(same, info, "fp32", pixels=pixel_pipeline(processor)).todo == []


def test_an_unknown_store_dtype_is_refused_before_torch_loads(tmp_path):
    from pyramid import extract

    (tmp_path / "in").mkdir()
    args = extract.get_args_parser().parse_args(["--input_dir", str(tmp_path / "in"), "--store_dtype", "fp64"])
    with pytest.raises(UsageError, match="unknown --store_dtype 'fp64'; use one of fp32, bf16, fp16"):
        extract.check_args(args)


def test_an_old_manifest_without_store_dtype_reads_as_fp32(trees, tmp_path):
    tree = tmp_path / "fp32"
    shutil.copytree(trees.root / "fp32", tree)
    manifest = json.loads((tree / MANIFEST_NAME).read_text())
    del manifest["store_dtype"]
    (tree / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert run_verify(tree) == 0
    assert PyramidDataset(tree).stored_dtype == torch.float32
