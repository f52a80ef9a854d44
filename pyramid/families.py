"""The model families (DINOv2, DINOv3): which models each takes, what it needs, its processor at a resolution.

Light (no torch): the extractor reads a local model's config.json here to refuse a DINOv3 without torchvision,
or a --resolution that is not a multiple of the patch size, before anything heavy loads.
"""

import importlib.util
import json
import os
from pathlib import Path

from pyramid.exits import UsageError

# transformers' model_type -> the family, as the manifest records it ("model_family").
FAMILY_OF_MODEL_TYPE = {"dinov2": "dinov2", "dinov2_with_registers": "dinov2", "dinov3_vit": "dinov3"}
FAMILIES = ("dinov2", "dinov3")
DEFAULT_FAMILY = "dinov2"  # what a manifest from before DINOv3 was supported was made by
# The processor backend whose pixels the files are: DINOv2's Pillow backend (the pixels of DINOv2's own evaluation
# code, whatever else is installed); DINOv3's processor exists on torchvision alone.
PROCESSOR_BACKEND = {"dinov2": "pil", "dinov3": "torchvision"}
INSTALL_DINOV3 = "pip install 'dinov2-feature-pyramids[dinov3]' (or pip install torchvision, the build for your torch)"


def family_of(model_type):
    """'dinov2' or 'dinov3' for a transformers model_type this tool extracts, else None."""
    return FAMILY_OF_MODEL_TYPE.get(model_type)


def torchvision_installed():
    """True where torchvision can be found (not imported: this runs before torch loads)."""
    return importlib.util.find_spec("torchvision") is not None


def torchvision_missing(name):
    """The one line that refuses a DINOv3 run where torchvision is missing."""
    return (f"{name} is a DINOv3, whose image processor (DINOv3ViTImageProcessor) exists only with torchvision, "
            f"which is not installed here: {INSTALL_DINOV3}")


def resolution_error(resolution, patch_size, name):
    """The one line for a --resolution that is not a multiple of the model's patch size, with the nearest ones."""
    below = resolution // patch_size * patch_size
    nearest = " or ".join(str(side) for side in (below, below + patch_size) if side > 0)
    return (f"--resolution {resolution} is not a multiple of the patch size {patch_size} of {name}: "
            f"use {nearest}")


def processor_overrides(family, own_resolution, own_shortest_edge, resolution):
    """The sizes to call the model's own processor with so that the model sees `resolution` x `resolution`:
    DINOv2 resizes the shortest edge to round(R x 256 / 224) (its own ratio: shortest edge 256 for crop 224) and
    crops R; DINOv3 resizes to R x R. {} where `resolution` is the processor's own."""
    if resolution is None or resolution == own_resolution:
        return {}
    if family == "dinov3":
        return {"size": {"height": resolution, "width": resolution}}
    return {"size": {"shortest_edge": round(resolution * own_shortest_edge / own_resolution)},
            "crop_size": {"height": resolution, "width": resolution}}


def peek_config(name):
    """The config.json of a local model directory, or of a hub id already in the HF cache, as a dict; None where
    it cannot be read without more (the model's loading then says why)."""
    directory = Path(os.path.expanduser(str(name)))
    path = directory / "config.json" if directory.is_dir() else None
    if path is None and str(name).count("/") <= 1:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(str(name), "config.json")
            path = Path(cached) if isinstance(cached, str) else None
        except Exception:  # not a valid repo id, no cache: the model's loading says what is wrong
            path = None
    try:
        config = json.loads(path.read_text()) if path is not None else None
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def check_model_up_front(name, resolution=None):
    """Refuse (UsageError) what the model's config.json already rules out, before torch loads: a DINOv3 where
    torchvision is missing, a --resolution that is not a multiple of the patch size. Models whose config cannot
    be read without loading are checked when they load (encoder.load_model_info)."""
    config = peek_config(name)
    if config is None:
        return
    family = family_of(config.get("model_type"))
    if family == "dinov3" and not torchvision_installed():
        raise UsageError(torchvision_missing(name))
    patch_size = config.get("patch_size")
    if family is not None and resolution is not None and isinstance(patch_size, int) and resolution % patch_size:
        raise UsageError(resolution_error(resolution, patch_size, name))
