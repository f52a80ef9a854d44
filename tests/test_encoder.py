"""pyramid/encoder.py: dtype resolution, model checks without weights, the encoder's output."""

import http.server
import importlib.util
import json
import shutil
import subprocess
import sys
import threading
import time

import pytest
import torch

from conftest import REPO, TINY_HIDDEN, needs_torchvision, save_tiny_dinov2
from pyramid.decode import Preprocess, is_pillow_processor
from pyramid.encoder import Encoder, ModelError, load_model_info, local_weights_digest, looks_local, resolve_dtype


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


TORCHVISION = importlib.util.find_spec("torchvision") is not None
with_torchvision = pytest.mark.skipif(not TORCHVISION, reason="torchvision is not installed (.ci/run's second "
                                                              "pass installs it)")


def test_the_processor_is_pillow_backed_whatever_is_installed(tiny_model):
    """AutoImageProcessor's default is the torchvision backend wherever torchvision is installed; the run's
    is the Pillow backend there too (this test runs in both of .ci/run's passes)."""
    processor = load_model_info(tiny_model)[1]
    assert is_pillow_processor(processor)
    assert (type(processor).__name__, processor.backend) == ("BitImageProcessorPil", "pil")


@with_torchvision
def test_the_same_processor_with_torchvision_hidden(tiny_model):
    code = ("import sys; sys.modules['torchvision'] = None\n"  # importlib.util.find_spec then says: not installed
            "from pyramid.encoder import load_model_info\n"
            f"processor = load_model_info({str(tiny_model)!r})[1]\n"
            "print(type(processor).__name__, processor.backend)")
    hidden = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert hidden.stdout.split() == ["BitImageProcessorPil", "pil"], hidden.stderr
    assert type(load_model_info(tiny_model)[1]).__name__ == "BitImageProcessorPil"


def test_a_processor_without_a_pillow_backend_is_refused(tmp_path):
    """DINOv3's processor has a torchvision backend only: transformers falls back to it where torchvision is
    installed (refused: its pixels are not Pillow's), and cannot load it where torchvision is not."""
    directory = save_tiny_dinov2(tmp_path / "m")
    config = json.loads((directory / "preprocessor_config.json").read_text())
    config["image_processor_type"] = "DINOv3ViTImageProcessor"
    (directory / "preprocessor_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError) as error:
        load_model_info(directory)
    if TORCHVISION:
        assert "(DINOv3ViTImageProcessor) has no Pillow backend" in str(error.value)
    assert "\n" not in str(error.value)


def test_a_dinov3_without_torchvision_is_refused_in_one_line(tiny_dinov3, monkeypatch):
    """Where config.json cannot be read up front (a hub id), the model's loading refuses, before its processor."""
    monkeypatch.setitem(sys.modules, "torchvision", None)  # not installed, as importlib and import see it
    with pytest.raises(ModelError) as error:
        load_model_info(tiny_dinov3)
    assert "is a DINOv3, whose image processor (DINOv3ViTImageProcessor) exists only with torchvision" in \
        str(error.value) and "pip install 'dinov2-feature-pyramids[dinov3]'" in str(error.value)
    assert "\n" not in str(error.value)


def test_a_resolution_sets_the_processor_and_the_grid(tiny_model):
    info, processor = load_model_info(tiny_model, 448)
    assert (info.crop_size, info.resolution, info.grid_size, info.family) == (448, 448, 32, "dinov2")
    assert (processor.size.shortest_edge, processor.crop_size.height, processor.crop_size.width) == (512, 448, 448)
    assert Preprocess(processor).direct == (512, 448, 448, processor.resample)  # the fast path still agrees
    with pytest.raises(ModelError, match="--resolution 230 is not a multiple of the patch size 14 of .*: use 224 or "
                                         "238"):
        load_model_info(tiny_model, 230)


@needs_torchvision
def test_dinov3_model_info_and_encoder_drop_cls_and_four_registers(tiny_dinov3):
    info, processor = load_model_info(tiny_dinov3)
    assert (info.family, info.crop_size, info.patch_size, info.grid_size) == ("dinov3", 224, 16, 14)
    assert (info.num_register_tokens, info.pixel_bytes, processor.backend) == (4, 4, "torchvision")
    info_256, processor_256 = load_model_info(tiny_dinov3, 256)
    assert (info_256.grid_size, processor_256.size.height, processor_256.size.width) == (16, 256, 256)
    preprocess = Preprocess(processor_256)
    pixels = torch.rand(2, 3, 256, 256)  # what DINOv3's workers hand over: rescaled floats
    encoder = Encoder(info_256, preprocess.normaliser("cpu"), "cpu", "fp32")
    patches = encoder(pixels)
    with torch.no_grad():
        full = encoder.model(pixel_values=preprocess.normaliser("cpu")(pixels)).last_hidden_state
    assert full.shape == (2, 1 + 4 + 256, TINY_HIDDEN)
    assert torch.equal(patches, full[:, 5:])  # CLS and 4 registers dropped


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
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="this directory has no config.json and no preprocessor_config.json and "
                                         r"no weights \(\*.safetensors or \*.bin\); a local model is"):
        load_model_info(tmp_path / "empty")
    (tmp_path / "vit").mkdir()
    (tmp_path / "vit" / "config.json").write_text(json.dumps({"model_type": "vit"}))
    (tmp_path / "vit" / "preprocessor_config.json").write_text((tiny_model / "preprocessor_config.json").read_text())
    (tmp_path / "vit" / "model.safetensors").write_bytes(b"")  # never read: the config refuses it first
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


def test_which_names_can_only_be_directories(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for name in ("/no/such/dir", "./m", "../m", "~/m", "a/b/c", "models/dinov2"):
        assert looks_local(name), name
    for name in ("facebook/dinov2-base", "dinov2-base", "facebok/dinov2-base"):
        assert not looks_local(name), name


def test_a_local_directory_missing_a_file_is_told_so_not_sent_to_the_hub(tmp_path, tiny_model, monkeypatch):
    """transformers' message for a missing preprocessor_config.json points at huggingface.co."""
    monkeypatch.chdir(tmp_path)
    for missing in ("config.json", "preprocessor_config.json", "model.safetensors"):
        shutil.copytree(tiny_model, tmp_path / "models" / missing)
        (tmp_path / "models" / missing / missing).unlink()
        with pytest.raises(ModelError) as error:
            load_model_info(f"models/{missing}")  # relative, no ./
        assert str(error.value).startswith(f"--model models/{missing}: this directory has no "), error.value
        assert "huggingface.co" not in str(error.value)


def test_a_relative_path_that_is_not_there_is_named_as_one_too(tmp_path, hub, monkeypatch):
    """'models/x' is a valid hub id too: when it is not on the hub, the message says it is no directory here either."""
    from huggingface_hub import constants

    monkeypatch.chdir(tmp_path)
    hub("http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError) as error:
        load_model_info("models/x")
    assert str(error.value).endswith(f"; nor is there a directory models/x in {tmp_path}"), error.value


def test_a_missing_local_directory_is_named_at_once(tmp_path):
    for name in ("/no/such/dir", str(tmp_path / "missing"), "./no_such_model", "a/b/c"):
        started = time.monotonic()
        with pytest.raises(ModelError) as error:
            load_model_info(name)
        assert time.monotonic() - started < 2, name  # no hub round trips, no retries
        assert str(error.value).startswith(f"--model {name}: no such directory"), error.value
        assert "\n" not in str(error.value) and "Repo id" not in str(error.value)


@pytest.fixture
def hub(monkeypatch):
    """Point the hub client at `endpoint` (a stand-in hub); the HF cache stays as it is."""
    from huggingface_hub import constants

    def point_at(endpoint):
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return point_at


def test_an_unreachable_hub_fails_fast_naming_the_cache_and_offline_mode(hub):
    hub("http://127.0.0.1:9")  # nothing listens on the discard port: refused at once
    started = time.monotonic()
    with pytest.raises(ModelError) as error:
        load_model_info("facebok/dinov2-base")
    assert time.monotonic() - started < 8  # one request, not ~35 s of retries
    message = str(error.value)
    assert message.startswith("model 'facebok/dinov2-base' is not in the HF cache (") and "\n" not in message
    assert "could not be reached" in message and "HF_HUB_OFFLINE=1" in message


def test_offline_mode_says_so(hub, monkeypatch):
    from huggingface_hub import constants

    hub("http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match=r"not in the HF cache \(.*\) and HF_HUB_OFFLINE=1 keeps the hub out"):
        load_model_info("facebok/dinov2-base")


class NoSuchRepo(http.server.BaseHTTPRequestHandler):
    """A hub that answers every request as the real one answers for a repository that does not exist."""

    def do_GET(self):
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


def test_a_hub_id_the_hub_does_not_have(hub):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NoSuchRepo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        hub(f"http://127.0.0.1:{server.server_port}")
        with pytest.raises(ModelError, match=r"^the hub has no model 'facebok/dinov2-base' that you may read .*"
                                             r"check the id, or log in"):
            load_model_info("facebok/dinov2-base")
    finally:
        server.shutdown()


def test_attention_is_sdpa_asked_for_by_name_and_the_kernel_is_named(tiny_model):
    from transformers import AutoModel

    from pyramid.encoder import attention_kernel

    info, processor = load_model_info(tiny_model)
    encoder = Encoder(info, Preprocess(processor).normaliser("cpu"), "cpu", "fp32")
    assert encoder.model.config._attn_implementation == "sdpa"
    assert attention_kernel(encoder, 2).startswith("sdpa: ")  # on this CPU: "sdpa: flash (CPU)"
    encoder.model = AutoModel.from_pretrained(tiny_model, attn_implementation="eager")
    assert attention_kernel(encoder, 2) == "eager: matmul + softmax"


class Shapes:
    """Stands in for the compiled model: runs the model, keeping the batch shapes it was called with."""

    def __init__(self, model, fail=False):
        self.model, self.fail, self.shapes = model, fail, []

    def __call__(self, pixel_values):
        self.shapes.append(tuple(pixel_values.shape))
        if self.fail:
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore lines")
        return self.model(pixel_values=pixel_values)


def test_compiled_model_sees_one_shape_and_short_batches_keep_their_values(tiny_model):
    info, processor = load_model_info(tiny_model)
    normalise = Preprocess(processor).normaliser("cpu")
    eager = Encoder(info, normalise, "cpu", "fp32")
    compiled = Encoder(info, normalise, "cpu", "fp32")
    compiled.compiled = Shapes(compiled.model)
    pixels = torch.randint(0, 256, (4, 3, 224, 224), dtype=torch.uint8)
    for rows in (4, 3, 1, 4):  # a batch with failures, the last batch: padded to the longest seen
        assert torch.allclose(compiled(pixels[:rows]), eager(pixels[:rows]), atol=1e-5)
    assert compiled.compiled.shapes == [(4, 3, 224, 224)] * 4


def test_a_model_that_cannot_compile_says_so_once_and_runs_uncompiled(tiny_model):
    info, processor = load_model_info(tiny_model)
    said = []
    encoder = Encoder(info, Preprocess(processor).normaliser("cpu"), "cpu", "fp32", warn=said.append)
    encoder.compiled = Shapes(encoder.model, fail=True)
    pixels = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    first, second = encoder(pixels), encoder(pixels)
    assert torch.equal(first, second) and encoder.compiled is None
    assert said == ["warning: --compile: the model cannot be compiled here (RuntimeError: InvalidCxxCompiler: "
                    "No working C++ compiler found); it runs uncompiled"]


def test_compile_on_a_machine_without_a_compiler_runs_uncompiled_with_one_line(tmp_path, tiny_model):
    # A real failure: torch.compile's CPU backend needs a C++ compiler, and CXX names none. Slow (~20 s on
    # a quiet 2-core machine: the model is traced before the compiler is looked for), but it is the only
    # check that --compile reaches the model and that a failed compilation costs nothing but its line.
    from conftest import run_cli, write_images
    from pyramid.decode import load_rgb
    from pyramid.levels import build_pyramid

    paths = write_images(tmp_path / "in", 3)
    result = run_cli("--input_dir", tmp_path / "in", "--output_dir", tmp_path / "out", "--model", tiny_model,
                     "--batch_size", 2, "--num_workers", 0, "--compile", env={"CXX": "/nonexistent/c++"})
    assert result.returncode == 0, result.stderr
    said = [line for line in result.stderr.splitlines() if "--compile" in line]
    assert len(said) == 1 and said[0].startswith("warning: --compile: the model cannot be compiled here ("), said
    assert "C++ compiler" in said[0] and said[0].endswith("it runs uncompiled")
    # The files are the uncompiled model's, bit for bit: the same batches of 2 and 1, computed here.
    info, processor = load_model_info(tiny_model)
    preprocess = Preprocess(processor)
    encoder = Encoder(info, preprocess.normaliser("cpu"), "cpu", "fp32")
    pixels = torch.stack([preprocess(load_rgb(path)) for path in paths])
    expected = [build_pyramid(encoder(pixels[start:start + 2]), info.grid_size) for start in (0, 2)]
    for number, path in enumerate(sorted((tmp_path / "out").glob("*.pt"))):
        written = torch.load(path, weights_only=True)
        assert all(torch.equal(written[key][0], expected[number // 2][key][number % 2]) for key in written), path
    record = json.loads((tmp_path / "out" / "runs.jsonl").read_text().splitlines()[-1])
    assert record["settings"]["compile"] is True
