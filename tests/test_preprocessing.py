"""The seed's tests (milestone 1), for real: the CLI on one known image with a tiny random DINOv2,
then the file checked for integrity, structure, shapes and dtype, and against an independent
computation with the model's own processor and a plain-loop pooling; then the same for DINOv3 and for
other resolutions, the processor called with their sizes."""

import json
import shutil

import pytest
import torch
from PIL import Image

from conftest import KNOWN_IMAGE, TINY_HIDDEN, TORCHVISION, run_cli, write_images

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


def reference_pyramid(model_dir, image_path, backend="pil", **sizes):
    """The pyramid computed independently: the model's own processor (called with `sizes`) and model, a loop
    for the means, down to 1x1 or the first odd side."""
    from transformers import AutoImageProcessor, AutoModel

    processor = AutoImageProcessor.from_pretrained(model_dir, backend=backend)  # the contract's pixels
    model = AutoModel.from_pretrained(model_dir).eval()
    pixels = processor(images=Image.open(image_path).convert("RGB"), return_tensors="pt", **sizes)["pixel_values"]
    with torch.no_grad():
        hidden = model(pixel_values=pixels).last_hidden_state[0]  # (1 + R + G*G, D)
    skip = 1 + getattr(model.config, "num_register_tokens", 0)
    side = pixels.shape[-1] // model.config.patch_size
    grid = hidden[skip:].reshape(side, side, -1)  # (row, col, D)
    pyramid = {f"{side}x{side}": grid}
    while grid.shape[0] % 2 == 0:
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


# --- DINOv3, and other resolutions -------------------------------------------------------------------------
# (model, --resolution or None, the processor's backend, the sizes it is called with, the levels of the files)
FAMILY_RUNS = {
    "dinov2-448": ("dinov2", 448, "pil", {"size": {"shortest_edge": 512}, "crop_size": {"height": 448, "width": 448}},
                   ["32x32", "16x16", "8x8", "4x4", "2x2", "1x1"]),
    "dinov3-224": ("dinov3", None, "torchvision", {}, ["14x14", "7x7"]),
    "dinov3-256": ("dinov3", 256, "torchvision", {"size": {"height": 256, "width": 256}},
                   ["16x16", "8x8", "4x4", "2x2", "1x1"]),
}


@pytest.fixture(scope="module")
def family_images(tmp_path_factory):
    """The known photograph and a non-square image, whose resize differs from a square one's."""
    directory = tmp_path_factory.mktemp("family_images")
    shutil.copy(KNOWN_IMAGE, directory / "00001.png")
    write_images(directory, 1, size=(300, 200), names=["00002.png"])
    return directory


@pytest.fixture(scope="module")
def family_tree(request, tmp_path_factory, family_images, tiny_model, tiny_dinov3):
    """The extractor's output tree (a real run of the CLI) for one of FAMILY_RUNS."""
    family, resolution, *_ = FAMILY_RUNS[request.param]
    if family == "dinov3" and not TORCHVISION:
        pytest.skip("torchvision is not installed: DINOv3's image processor needs it (.ci/run's second pass has it)")
    output_dir = tmp_path_factory.mktemp(request.param) / "out"
    model = tiny_dinov3 if family == "dinov3" else tiny_model
    result = run_cli("--input_dir", family_images, "--output_dir", output_dir, "--model", model,
                     *(("--resolution", resolution) if resolution else ()))
    assert result.returncode == 0, result.stderr
    return request.param, model, output_dir


@pytest.mark.parametrize("family_tree", list(FAMILY_RUNS), indirect=True)
def test_each_family_and_resolution_matches_its_processor_and_model(family_tree, family_images):
    """Levels, shapes and values against the model's own processor called with the resolution's sizes, its
    own model (its position embeddings interpolated, or RoPE, by itself) and plain loops; the manifest says
    what made them, and verify --recompute, which re-encodes with the manifest's settings, agrees."""
    from pyramid import verify

    name, model, output_dir = family_tree
    family, resolution, backend, sizes, levels = FAMILY_RUNS[name]
    for image in ("00001", "00002"):
        pyramid = torch.load(output_dir / f"{image}.pt", weights_only=True)
        expected = reference_pyramid(model, family_images / f"{image}.png", backend, **sizes)
        assert list(pyramid) == list(expected) == levels
        for key, side in zip(levels, (int(level.split("x")[0]) for level in levels)):
            assert pyramid[key].shape == (1, side * side, TINY_HIDDEN), key
            assert torch.allclose(pyramid[key], expected[key], atol=1e-4, rtol=1e-4), (image, key)
    manifest = json.loads((output_dir / "manifest.json").read_text())
    side = resolution or 224
    assert (manifest["model_family"], manifest["resolution"], manifest["crop_size"]) == (family, side, side)
    assert (manifest["grid_size"], manifest["levels"]) == (int(levels[0].split("x")[0]), levels)
    assert manifest["image_processor"]["backend"] == backend
    args = verify.get_args_parser().parse_args([str(output_dir), "--input_dir", str(family_images),
                                                "--recompute", "2"])
    assert verify.main(args) == 0


@pytest.mark.parametrize("family_tree", ["dinov2-448"], indirect=True)
def test_a_rerun_at_another_resolution_is_refused_and_an_old_manifest_is_a_dinov2_at_its_crop(
        family_tree, family_images, pyramid_file, tmp_path):
    from pyramid.decode import pixel_pipeline
    from pyramid.encoder import load_model_info
    from pyramid.exits import UsageError
    from pyramid.plan import plan_run
    from pyramid.settings import Settings

    _, model, output_dir = family_tree
    info, processor = load_model_info(model)  # the processor's own 224
    settings = Settings(input_dir=str(family_images), output_dir=str(output_dir), model=str(model))
    with pytest.raises(UsageError, match=r"other settings \(.*resolution: 448 -> 224.*--overwrite"):
        plan_run(settings, info, "fp32", pixels=pixel_pipeline(processor))
    # A tree made before model_family and resolution were recorded: kept, its file skipped, not refused.
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(pyramid_file, old / "00001.pt")
    manifest = json.loads((pyramid_file.parent / "manifest.json").read_text())
    (old / "manifest.json").write_text(json.dumps({key: value for key, value in manifest.items()
                                                   if key not in ("model_family", "resolution")}))
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(KNOWN_IMAGE, images / "00001.png")
    plan = plan_run(Settings(input_dir=str(images), output_dir=str(old), model=str(model)), info, "fp32",
                    pixels=pixel_pipeline(processor))
    assert (plan.skipped, plan.todo) == (1, [])
