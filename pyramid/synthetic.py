"""Made-up inputs for the bench and the tests: random-weight models, synthetic faces, synthetic output trees.

The models are DINOv2 and DINOv3 of the real sizes with the real processor configs, saved offline: their speed
is the real models' (the same shapes), their features are noise; the configs are the ones the hub's checkpoints
ship, field for field. The faces are the bundled photograph, varied; the trees are pyramid files and a
manifest as a run writes them, with true 2x2 means computed here (not by pyramid.levels).
"""

import json
from pathlib import Path

from pyramid.tree import flip_twin

# Shipped in the package (pyproject's package-data), so the bench runs from an installed wheel too.
PHOTO = Path(__file__).resolve().parent / "data" / "astronaut.png"
# The synthetic trees' default shape: a 16x16 grid, as DINOv2 at 224 gives, of D=8 (small files for tests).
GRID, HIDDEN = 16, 8
LEVELS = ["16x16", "8x8", "4x4", "2x2", "1x1"]

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
# The preprocessor_config.json that facebook/dinov3-vit{s,b,l}16-pretrain-lvd1689m ship, verbatim: rescale,
# a bilinear (resample 2) resize to 224 x 224 with antialiasing on the floats, ImageNet mean and std.
DINOV3_PREPROCESSOR = {
    "crop_size": None,
    "data_format": "channels_first",
    "default_to_square": True,
    "device": None,
    "disable_grouping": None,
    "do_center_crop": None,
    "do_convert_rgb": None,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_processor_type": "DINOv3ViTImageProcessorFast",
    "image_std": [0.229, 0.224, 0.225],
    "input_data_format": None,
    "resample": 2,
    "rescale_factor": 0.00392156862745098,
    "return_tensors": None,
    "size": {"height": 224, "width": 224},
}
# The config.json fields the DINOv3 ViT checkpoints share (patch 16, 4 registers, RoPE); the size's own
# hidden size, layers, heads and MLP width come from DINOV3_SIZES.
DINOV3_CONFIG = {
    "architectures": ["DINOv3ViTModel"], "attention_dropout": 0.0, "drop_path_rate": 0.0, "hidden_act": "gelu",
    "image_size": 224, "initializer_range": 0.02, "key_bias": False, "layer_norm_eps": 1e-05,
    "layerscale_value": 1.0, "mlp_bias": True, "num_channels": 3, "num_register_tokens": 4, "patch_size": 16,
    "pos_embed_jitter": None, "pos_embed_rescale": 2.0, "pos_embed_shift": None, "proj_bias": True,
    "query_bias": True, "rope_theta": 100.0, "use_gated_mlp": False, "value_bias": True,
}
# (hidden size, layers, heads) of each size, and a tiny one for tests; the MLP is 4 x hidden in both families.
RANDOM_SIZES = {"tiny": (32, 2, 2), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16)}


def _quiet_transformers():
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


def save_random_dinov2(directory, size="base", registers=0, seed=0):
    """Save a random-weight DINOv2 of a real size (patch 14, image_size 518) with the real
    dinov2 preprocessor config, in save_pretrained layout. Returns the directory."""
    import torch
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    _quiet_transformers()
    hidden_size, layers, heads = RANDOM_SIZES[size]
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


def save_random_dinov3(directory, size="base", seed=0):
    """Save a random-weight DINOv3 ViT of a real size (DINOV3_CONFIG: patch 16, 4 registers) with the real
    dinov3 preprocessor config, in save_pretrained layout. Returns the directory. Needs no torchvision
    (only its image processor does)."""
    import torch
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    _quiet_transformers()
    hidden_size, layers, heads = RANDOM_SIZES[size]
    torch.manual_seed(seed)
    fields = {key: value for key, value in DINOV3_CONFIG.items() if key != "architectures"}
    model = DINOv3ViTModel(DINOv3ViTConfig(hidden_size=hidden_size, num_hidden_layers=layers,
                                           num_attention_heads=heads, intermediate_size=hidden_size * 4, **fields))
    directory = Path(directory)
    model.save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(json.dumps(DINOV3_PREPROCESSOR, indent=2))
    return directory


def save_random_model(directory, family="dinov2", size="base", seed=0):
    """save_random_dinov2 or save_random_dinov3 by `family`."""
    if family == "dinov3":
        return save_random_dinov3(directory, size, seed=seed)
    return save_random_dinov2(directory, size, seed=seed)


def write_synthetic_faces(directory, count, side=1024, seed=0):
    """`count` real-looking side x side PNGs: the bundled face photograph, resized, flipped, rotated
    and recoloured at random. Real photographs compress (and decode) unlike noise does."""
    import numpy as np
    from PIL import Image, ImageEnhance

    rng = np.random.default_rng(seed)
    photo = Image.open(PHOTO).convert("RGB").resize((side, side), Image.Resampling.BICUBIC)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else photo
        image = ImageEnhance.Color(image).enhance(0.5 + rng.random())
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        image = image.rotate(float(rng.uniform(-10, 10)), resample=Image.Resampling.BICUBIC, fillcolor=fill)
        image.save(directory / f"{i:05d}.png")
    return directory


def _means_down(level, grid, hidden):
    """{"GxG": level, "G/2xG/2": its 2x2 means, ...} down to an odd side; level (1, G*G, D), row-major."""
    pyramid, side = {}, grid
    while True:
        pyramid[f"{side}x{side}"] = level
        if side % 2:
            return pyramid
        grid_view = level.reshape(1, side // 2, 2, side // 2, 2, hidden)  # (1, s/2, 2, s/2, 2, D)
        side //= 2
        level = grid_view.mean(dim=(2, 4)).reshape(1, side * side, hidden).contiguous()


def make_pyramid(seed, grid=GRID, hidden=HIDDEN, flip=False):
    """A correct pyramid: a random (1, grid*grid, D) level seeded by `seed`, then true 2x2 means down to an odd
    side; with `flip` also the flip/ twins, the same computed on the grid mirrored left to right."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    patches = torch.randn(1, grid * grid, hidden, generator=generator)  # (1, G*G, D)
    pyramid = _means_down(patches, grid, hidden)
    if flip:
        mirrored = patches.reshape(1, grid, grid, hidden).flip(2).reshape(1, grid * grid, hidden)
        pyramid.update({flip_twin(key): value for key, value in _means_down(mirrored, grid, hidden).items()})
    return pyramid


def tree_manifest(grid=GRID, hidden=HIDDEN, flip=False):
    """The manifest.json a run writes, for trees made by make_pyramid (fp32, a model named "synthetic")."""
    from pyramid.encoder import ModelInfo
    from pyramid.manifest import build_manifest

    info = ModelInfo(name="synthetic", revision=None, crop_size=grid * 14, patch_size=14, hidden_size=hidden,
                     num_register_tokens=0)
    return build_manifest(info, "fp32", flip=flip)


def numbered_names(count):
    """The names "00000", "00001", ... of `count` files."""
    return [f"{index:05d}" for index in range(count)]


def write_tree(directory, names, grid=GRID, hidden=HIDDEN, flip=False, with_manifest=True):
    """An output tree as the extractor writes it: one pyramid per relative name (`"a/b"` -> `a/b.pt`, made by
    make_pyramid seeded by the name's index, saved atomically from a buffer) and its manifest.json. Returns
    the directory."""
    from pyramid.manifest import write_manifest
    from pyramid.writer import save_atomic

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if with_manifest:
        write_manifest(directory, tree_manifest(grid, hidden, flip))
    for index, name in enumerate(names):
        path = directory / f"{name}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_atomic(make_pyramid(index, grid, hidden, flip), path)
    return directory
