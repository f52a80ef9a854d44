"""The seed's tests (milestone 1), for real: the CLI on one known image with a tiny random DINOv2,
then the file checked for integrity, structure, shapes and dtype, and against an independent
computation with the model's own processor and a plain-loop pooling."""

import shutil

import pytest
import torch
from PIL import Image

from conftest import KNOWN_IMAGE, TINY_HIDDEN, run_cli

LEVELS = {"16x16": 16, "8x8": 8, "4x4": 4, "2x2": 2, "1x1": 1}


def extract_one(tmp_path, model):
    input_dir, output_dir = tmp_path / "raw_images", tmp_path / "feature_pyramids"
    input_dir.mkdir()
    shutil.copy(KNOWN_IMAGE, input_dir / "00001.png")
    result = run_cli("--input_dir", input_dir, "--output_dir", output_dir, "--model", model)
    assert result.returncode == 0, result.stderr
    return output_dir / "00001.pt"


@pytest.fixture(scope="module")
def pyramid_file(tmp_path_factory, tiny_model):
    return extract_one(tmp_path_factory.mktemp("seed"), tiny_model)


def reference_pyramid(model_dir, image_path):
    """The pyramid computed independently: the model's own processor and model, a loop for the means."""
    from transformers import AutoImageProcessor, AutoModel

    processor = AutoImageProcessor.from_pretrained(model_dir, backend="pil")  # the contract's pixels
    model = AutoModel.from_pretrained(model_dir).eval()
    pixels = processor(images=Image.open(image_path).convert("RGB"), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        hidden = model(pixel_values=pixels).last_hidden_state[0]  # (1 + R + 256, D)
    skip = 1 + getattr(model.config, "num_register_tokens", 0)
    grid = hidden[skip:].reshape(16, 16, -1)  # (row, col, D)
    pyramid = {"16x16": grid}
    while grid.shape[0] > 1:
        half = grid.shape[0] // 2
        coarser = torch.empty(half, half, grid.shape[-1])
        for row in range(half):
            for col in range(half):
                coarser[row, col] = grid[2 * row:2 * row + 2, 2 * col:2 * col + 2].reshape(4, -1).mean(dim=0)
        grid = coarser
        pyramid[f"{half}x{half}"] = grid
    return {key: value.reshape(1, -1, value.shape[-1]) for key, value in pyramid.items()}


def test_file_loads(pyramid_file):
    """Test case 1: the saved pyramid loads back."""
    assert torch.load(pyramid_file, weights_only=True) is not None


def test_format_and_structure(pyramid_file):
    """Test case 2: a dict with the expected keys, each a tensor, and nothing else."""
    pyramid = torch.load(pyramid_file, weights_only=True)
    assert isinstance(pyramid, dict)
    assert list(pyramid) == list(LEVELS)
    assert all(isinstance(value, torch.Tensor) for value in pyramid.values())


def test_shapes_and_dtype(pyramid_file):
    """Test case 3: [1, s*s, hidden] float32, contiguous, each owning only its own storage."""
    pyramid = torch.load(pyramid_file, weights_only=True)
    assert pyramid["8x8"].shape == (1, 64, TINY_HIDDEN)
    for key, side in LEVELS.items():
        value = pyramid[key]
        assert value.shape == (1, side * side, TINY_HIDDEN), key
        assert value.dtype == torch.float32, key
        assert value.is_contiguous(), key
        assert value.untyped_storage().nbytes() == value.numel() * 4, key
        assert torch.isfinite(value).all(), key


def test_values_match_an_independent_reference(pyramid_file, tiny_model):
    pyramid = torch.load(pyramid_file, weights_only=True)
    expected = reference_pyramid(tiny_model, KNOWN_IMAGE)
    for key in LEVELS:
        assert torch.allclose(pyramid[key], expected[key], atol=1e-4, rtol=1e-4), key
    assert pyramid["16x16"].std() > 0.1  # real features, not zeros


def test_registers_are_dropped(tmp_path, tiny_model_registers):
    pyramid = torch.load(extract_one(tmp_path, tiny_model_registers), weights_only=True)
    expected = reference_pyramid(tiny_model_registers, KNOWN_IMAGE)
    for key in LEVELS:
        assert torch.allclose(pyramid[key], expected[key], atol=1e-4, rtol=1e-4), key
