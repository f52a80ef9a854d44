"""Shared fixtures: tiny random-weight DINOv2 and DINOv3 models saved with save_pretrained, and real image files."""

import importlib.util
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
# Tests import the package from the checkout, with no install step.
sys.path.insert(0, str(REPO))

import warm  # noqa: E402
from pyramid.synthetic import RANDOM_SIZES, save_random_dinov2, save_random_dinov3  # noqa: E402

DATA = Path(__file__).resolve().parent / "data"
KNOWN_IMAGE = REPO / "pyramid" / "data" / "astronaut.png"  # shipped in the package: pyramid.synthetic draws on it

TINY_HIDDEN = RANDOM_SIZES["tiny"][0]
# DINOv3's image processor exists in transformers only with torchvision, which requirements.txt leaves out (the
# dinov3 extra): the tests that run a DINOv3 skip without it; .ci/run's second pass runs them with it.
TORCHVISION = importlib.util.find_spec("torchvision") is not None
needs_torchvision = pytest.mark.skipif(not TORCHVISION, reason="torchvision is not installed: DINOv3's image "
                                                               "processor needs it (.ci/run's second pass has it)")


def save_tiny_dinov2(directory, registers=0, seed=0):
    """A tiny random-weight DINOv2 (patch 14, image_size 518 like the real one) with the real
    dinov2 preprocessor config, saved with save_pretrained: the real loading path, tiny sizes."""
    return save_random_dinov2(directory, "tiny", registers=registers, seed=seed)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Path of a tiny random-weight DINOv2 in save_pretrained layout."""
    return save_tiny_dinov2(tmp_path_factory.mktemp("tiny_dinov2"))


@pytest.fixture(scope="session")
def tiny_model_registers(tmp_path_factory):
    """Path of a tiny random-weight DINOv2-with-registers (4 registers)."""
    return save_tiny_dinov2(tmp_path_factory.mktemp("tiny_dinov2_reg"), registers=4)


@pytest.fixture(scope="session")
def tiny_dinov3(tmp_path_factory):
    """Path of a tiny random-weight DINOv3 ViT (patch 16, 4 registers, RoPE) with the real dinov3 processor
    config, in save_pretrained layout (saving needs no torchvision; loading its processor does)."""
    return save_random_dinov3(tmp_path_factory.mktemp("tiny_dinov3"), "tiny")


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
    return warm.run([sys.executable, str(REPO / "extract_distributed.py"), *map(str, args)],
                    cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)


def free_port():
    """A TCP port nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def accelerate_launch(config):
    """The start of an `accelerate launch` command line with `config`, on a port of its own: the suite runs its
    files in parallel (pytest-xdist), and two launches on accelerate's default port 29500 would meet."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
            "--main_process_port", str(free_port())]


# The files that take longest start first, so that xdist's workers fill in around them: test_slurm.py waits minutes
# on a cluster's scheduler, and in name order it started when most of the suite was done (.ci/run's longest path).
LONGEST_FIRST = ("test_slurm.py", "test_faults.py", "test_cli.py", "test_chunks.py")


def pytest_collection_modifyitems(items):
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's tests keep their order
