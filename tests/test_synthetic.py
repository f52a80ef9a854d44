"""pyramid/synthetic.py: random-weight models with the real configs of their families, real-looking faces, and
output trees as a run writes them."""

import json
import zipfile

import numpy as np
import torch
from PIL import Image

from conftest import TINY_HIDDEN
from pyramid.synthetic import (
    DINOV2_PREPROCESSOR,
    DINOV3_CONFIG,
    DINOV3_PREPROCESSOR,
    LEVELS,
    make_pyramid,
    numbered_names,
    write_synthetic_faces,
    write_tree,
)


def test_a_saved_dinov3_has_the_real_config_and_processor_config(tiny_dinov3):
    config = json.loads((tiny_dinov3 / "config.json").read_text())
    assert {key: config.get(key) for key in DINOV3_CONFIG} == DINOV3_CONFIG  # every field the hub's configs share
    assert (config["model_type"], config["hidden_size"], config["intermediate_size"]) == \
        ("dinov3_vit", TINY_HIDDEN, 4 * TINY_HIDDEN)
    assert (config["patch_size"], config["num_register_tokens"]) == (16, 4)
    assert json.loads((tiny_dinov3 / "preprocessor_config.json").read_text()) == DINOV3_PREPROCESSOR
    assert DINOV3_PREPROCESSOR["size"] == {"height": 224, "width": 224} and DINOV3_PREPROCESSOR["resample"] == 2


def test_a_saved_dinov2_has_the_real_processor_config(tiny_model):
    assert json.loads((tiny_model / "preprocessor_config.json").read_text()) == DINOV2_PREPROCESSOR
    assert json.loads((tiny_model / "config.json").read_text())["patch_size"] == 14


def test_synthetic_faces_are_real_looking_pngs(tmp_path):
    paths = sorted(write_synthetic_faces(tmp_path, 2, side=128).iterdir())
    first, second = (np.asarray(Image.open(path)) for path in paths)
    assert first.shape == (128, 128, 3) and first.std() > 20
    assert not np.array_equal(first, second)


def test_a_synthetic_tree_is_what_a_run_writes(tmp_path, capsys):
    from pyramid import verify

    tree = write_tree(tmp_path / "tree", ["a", "sub/b"], flip=True)
    manifest = json.loads((tree / "manifest.json").read_text())
    assert (manifest["levels"], manifest["flip"], manifest["grid_size"], manifest["hidden_size"]) == \
        (LEVELS, True, 16, 8)
    assert verify.check_manifest(manifest) == []
    twins = [f"flip/{level}" for level in LEVELS]
    for index, name in enumerate(["a", "sub/b"]):
        pyramid = torch.load(tree / f"{name}.pt", weights_only=True)
        assert list(pyramid) == LEVELS + twins
        assert all(torch.equal(value, make_pyramid(index, flip=True)[key]) for key, value in pyramid.items())
        for finer, coarser in zip(LEVELS, LEVELS[1:]):  # true 2x2 means, computed here another way
            side = int(finer.split("x")[0])
            grid = pyramid[finer].reshape(side, side, 8).permute(2, 0, 1)  # (D, s, s)
            pooled = torch.nn.functional.avg_pool2d(grid, 2).permute(1, 2, 0).reshape(1, -1, 8)
            assert torch.allclose(pooled, pyramid[coarser], atol=1e-6), (name, coarser)
        for level in LEVELS:  # the twin of the mirrored grid is the mirror of the image's, at every level
            side = int(level.split("x")[0])
            mirrored = pyramid[level].reshape(side, side, 8).flip(1).reshape(1, -1, 8)
            assert torch.allclose(pyramid[f"flip/{level}"], mirrored, atol=1e-6), (name, level)
    assert not torch.equal(make_pyramid(0)["16x16"], make_pyramid(1)["16x16"])
    # The extractor's bytes: files of one shape have one layout, whatever their names.
    with zipfile.ZipFile(tree / "a.pt") as first, zipfile.ZipFile(tree / "sub" / "b.pt") as second:
        assert first.namelist() == second.namelist()
    assert verify.main(verify.get_args_parser().parse_args([str(tree)])) == 0, capsys.readouterr()


def test_synthetic_trees_of_other_grids_and_without_a_manifest(tmp_path):
    assert numbered_names(3) == ["00000", "00001", "00002"]
    tree = write_tree(tmp_path / "tree", numbered_names(2), grid=14, hidden=4, with_manifest=False)
    assert sorted(path.name for path in tree.iterdir()) == ["00000.pt", "00001.pt"]
    pyramid = torch.load(tree / "00001.pt", weights_only=True)
    assert {key: tuple(value.shape) for key, value in pyramid.items()} == {"14x14": (1, 196, 4), "7x7": (1, 49, 4)}
