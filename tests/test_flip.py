"""--flip: flip/ levels are the pyramid of the mirrored image, decoded once, encoded in the same batch."""

import json

import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor

from conftest import run_cli, write_images
from pyramid.decode import Preprocess, collate
from pyramid.encoder import ModelInfo
from pyramid.levels import split_twins
from pyramid.manifest import build_manifest
from pyramid.tree import manifest_differences, read_manifest
from pyramid.verify import get_args_parser as verify_parser
from pyramid.verify import main as verify_main

LEVELS = ["16x16", "8x8", "4x4", "2x2", "1x1"]
# Both resize to a long edge of 299 at shortest edge 256: a centre-crop margin of 75, odd. Across the
# landscape one's width, the crop of the mirrored image is not the mirror of the crop (37 columns cut
# on one side, 38 on the other).
ODD_MARGIN_SIZES = [(301, 257), (257, 301)]


def mirror_tree(source, target):
    target.mkdir(parents=True)
    for path in sorted(source.iterdir()):
        Image.open(path).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(target / path.name)


def test_preprocess_flip_is_the_processor_of_the_mirrored_image(tiny_model):
    processor = AutoImageProcessor.from_pretrained(tiny_model, backend="pil")
    rng = np.random.default_rng(0)
    for width, height in ODD_MARGIN_SIZES:
        image = Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))
        twins = Preprocess(processor, flip=True)(image)  # (2, 3, 224, 224)
        mirrored = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        expected = processor(images=mirrored, do_rescale=False, do_normalize=False,
                             return_tensors="pt")["pixel_values"][0]
        assert twins.shape == (2, 3, 224, 224)
        assert torch.equal(twins[0], Preprocess(processor)(image))
        assert torch.equal(twins[1], expected.to(torch.uint8))
        if width > height:  # the shortcut of mirroring the crop would be one column off
            assert not torch.equal(twins[1], twins[0].flip(-1))


def test_collate_puts_the_mirrors_after_the_images_and_split_twins_undoes_it():
    items = [(0, torch.stack([torch.full((3, 2, 2), 1), torch.full((3, 2, 2), 11)]), None),
             (1, None, "broken"),
             (2, torch.stack([torch.full((3, 2, 2), 2), torch.full((3, 2, 2), 12)]), None)]
    indices, pixels, failures = collate(items)
    assert indices.tolist() == [0, 2] and failures == [(1, "broken")]
    assert pixels.shape == (4, 3, 2, 2) and pixels[:, 0, 0, 0].tolist() == [1, 2, 11, 12]
    twins = split_twins({"2x2": pixels.reshape(4, 3, 4).float(), "1x1": pixels[:, :, :1, 0].float()})
    assert list(twins) == ["2x2", "1x1", "flip/2x2", "flip/1x1"]
    assert twins["2x2"][:, 0, 0].tolist() == [1, 2] and twins["flip/1x1"][:, 0, 0].tolist() == [11, 12]


def test_flip_levels_equal_extracting_a_mirrored_copy(tmp_path, tiny_model):
    for index, size in enumerate(ODD_MARGIN_SIZES):
        write_images(tmp_path / "in", 1, size=size, seed=index, names=[f"{index}.png"])
    mirror_tree(tmp_path / "in", tmp_path / "mirrored")
    common = ("--model", tiny_model, "--batch_size", 2, "--num_workers", 0)
    flipped = run_cli("--input_dir", tmp_path / "in", "--output_dir", tmp_path / "out", "--flip", *common)
    assert flipped.returncode == 0, flipped.stderr
    plain = run_cli("--input_dir", tmp_path / "mirrored", "--output_dir", tmp_path / "mirror_out", *common)
    assert plain.returncode == 0, plain.stderr

    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["flip"] is True
    for name in ("0.pt", "1.pt"):
        twins = torch.load(tmp_path / "out" / name, weights_only=True)
        mirror = torch.load(tmp_path / "mirror_out" / name, weights_only=True)
        assert list(twins) == LEVELS + [f"flip/{level}" for level in LEVELS]
        assert list(mirror) == LEVELS
        for level in LEVELS:
            # The same images through the same model; only the batch (4 vs 2 images) differs.
            assert torch.allclose(twins[f"flip/{level}"], mirror[level], rtol=1e-5, atol=1e-5), level
            assert not torch.allclose(twins[level], mirror[level], rtol=1e-3, atol=1e-3), level
            assert twins[f"flip/{level}"].untyped_storage().nbytes() == twins[f"flip/{level}"].numel() * 4

    assert verify_main(verify_parser().parse_args([str(tmp_path / "out")])) == 0  # flip/ levels pool consistently

    # Another --flip into the same directory is another setting: refused before any work.
    again = run_cli("--input_dir", tmp_path / "in", "--output_dir", tmp_path / "out", *common)
    assert again.returncode == 2 and "flip: True -> False" in again.stderr, again.stderr


def test_a_manifest_from_before_flip_reads_as_flip_false(tmp_path):
    wanted = build_manifest(ModelInfo("m", None, 224, 14, 8, 0), "fp32")
    old = {key: value for key, value in wanted.items() if key != "flip"}
    (tmp_path / "manifest.json").write_text(json.dumps(old))
    assert wanted["flip"] is False and manifest_differences(read_manifest(tmp_path), wanted) == []
    assert manifest_differences(read_manifest(tmp_path), {**wanted, "flip": True}) == ["flip: False -> True"]
