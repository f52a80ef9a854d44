"""Random-weight DINOv2 and DINOv3 models of the real sizes, with the real processor configs, saved offline.

Their speed is the real models' (the same shapes), their features are noise: for the bench, the tests and
trying the tools without the hub. The configs are the ones the hub's checkpoints ship, field for field.
"""

import json
from pathlib import Path

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
