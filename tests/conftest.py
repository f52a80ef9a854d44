"""Shared fixtures: a tiny random-weight DINOv2 saved with save_pretrained, and real image files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
# Tests import the package from the checkout, with no install step.
sys.path.insert(0, str(REPO))
DATA = Path(__file__).resolve().parent / "data"
KNOWN_IMAGE = DATA / "astronaut.png"

# The preprocessor_config.json that facebook/dinov2-base ships, verbatim.
DINOV2_PREPROCESSOR = {
    "crop_size": {"height": 224, "width": 224},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_processor_type": "BitImageProcessor",
    "image_std": [0.229, 0.224, 0.225],
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 256},
}

TINY_HIDDEN = 32


def save_tiny_dinov2(directory, registers=0, hidden_size=TINY_HIDDEN, layers=2, heads=2, seed=0):
    """Save a random-weight DINOv2 (patch 14, image_size 518 like the real one) and the real processor config."""
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(seed)
    common = dict(hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=heads,
                  intermediate_size=hidden_size * 4, patch_size=14, image_size=518)
    if registers:
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=registers, **common))
    else:
        model = Dinov2Model(Dinov2Config(**common))
    directory = Path(directory)
    model.save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(json.dumps(DINOV2_PREPROCESSOR, indent=2))
    return directory


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Path of a tiny random-weight DINOv2 in save_pretrained layout."""
    return save_tiny_dinov2(tmp_path_factory.mktemp("tiny_dinov2"))


@pytest.fixture(scope="session")
def tiny_model_registers(tmp_path_factory):
    """Path of a tiny random-weight DINOv2-with-registers (4 registers)."""
    return save_tiny_dinov2(tmp_path_factory.mktemp("tiny_dinov2_reg"), registers=4)


def write_images(directory, count, size=(64, 48), suffix=".png", seed=0, names=None):
    """Write `count` random RGB images (real files, real encoders) and return their paths, sorted."""
    rng = np.random.default_rng(seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        name = names[i] if names else f"{i:05d}{suffix}"
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return sorted(paths)


def run_cli(*args, cwd=REPO, timeout=600, env=None):
    """Run `python extract_distributed.py ARGS` in a subprocess; return the CompletedProcess."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable, str(REPO / "extract_distributed.py"), *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)
