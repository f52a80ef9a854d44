"""pyramid/random_models.py: random-weight models saved with the real configs of their families."""

import json

from conftest import TINY_HIDDEN
from pyramid.random_models import DINOV2_PREPROCESSOR, DINOV3_CONFIG, DINOV3_PREPROCESSOR


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
