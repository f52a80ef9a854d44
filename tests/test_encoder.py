"""pyramid/encoder.py: dtype resolution, model checks without weights, the encoder's output."""

import json

import pytest
import torch

from conftest import TINY_HIDDEN, save_tiny_dinov2
from pyramid.decode import Preprocess
from pyramid.encoder import Encoder, ModelError, load_model_info, local_weights_digest, resolve_dtype


def test_resolve_dtype():
    assert resolve_dtype("auto", "cpu") == "fp32"
    assert resolve_dtype("auto", "cuda:0") == "fp16"
    assert resolve_dtype("bf16", "cpu") == "bf16"


def test_model_info_of_dinov2_and_registers(tiny_model, tiny_model_registers):
    info, processor = load_model_info(tiny_model)
    assert (info.crop_size, info.patch_size, info.grid_size) == (224, 14, 16)
    assert (info.hidden_size, info.num_register_tokens) == (TINY_HIDDEN, 0)
    assert info.revision.startswith("sha256:")
    assert load_model_info(tiny_model_registers)[0].num_register_tokens == 4


def test_weights_digest_changes_with_the_weights(tmp_path):
    save_tiny_dinov2(tmp_path / "m")
    first = local_weights_digest(tmp_path / "m")
    assert local_weights_digest(tmp_path / "m") == first
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        model.embeddings.cls_token.add_(1.0)  # same shapes, same config: only a value differs
    model.save_pretrained(tmp_path / "m")
    assert local_weights_digest(tmp_path / "m") != first


def test_unusable_models_are_refused_in_one_line(tmp_path, tiny_model):
    with pytest.raises(ModelError, match="cannot load model"):
        load_model_info(tmp_path / "missing")
    (tmp_path / "vit").mkdir()
    (tmp_path / "vit" / "config.json").write_text(json.dumps({"model_type": "vit"}))
    (tmp_path / "vit" / "preprocessor_config.json").write_text((tiny_model / "preprocessor_config.json").read_text())
    with pytest.raises(ModelError, match="DINOv2"):
        load_model_info(tmp_path / "vit")


def test_encoder_returns_fp32_patches_without_special_tokens(tiny_model_registers):
    info, processor = load_model_info(tiny_model_registers)
    preprocess = Preprocess(processor)
    pixels = torch.randint(0, 256, (3, 3, 224, 224), dtype=torch.uint8)
    for dtype in ("fp32", "bf16"):
        encoder = Encoder(info, preprocess.normaliser("cpu"), "cpu", dtype)
        patches = encoder(pixels)
        assert patches.shape == (3, 256, TINY_HIDDEN) and patches.dtype == torch.float32
    with torch.no_grad():
        full = encoder.model(pixel_values=preprocess.normaliser("cpu")(pixels).to(torch.bfloat16)).last_hidden_state
    assert torch.equal(patches, full[:, 5:].float())  # CLS and 4 registers dropped
