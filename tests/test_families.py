"""pyramid/families.py: the processor sizes of a --resolution, and the refusals read from config.json before torch."""

import json
import subprocess
import sys
import time

import pytest

import warm
from conftest import REPO, TORCHVISION, write_images
from pyramid.exits import UsageError
from pyramid.families import check_model_up_front, family_of, peek_config, processor_overrides, resolution_error


def test_families_of_the_model_types():
    assert [family_of(kind) for kind in ("dinov2", "dinov2_with_registers", "dinov3_vit", "vit")] \
        == ["dinov2", "dinov2", "dinov3", None]


def test_the_processor_sizes_of_a_resolution():
    # DINOv2: shortest edge round(R x 256 / 224), centre crop R; 448 -> 512 then 448.
    assert processor_overrides("dinov2", 224, 256, 448) == {"size": {"shortest_edge": 512},
                                                            "crop_size": {"height": 448, "width": 448}}
    assert processor_overrides("dinov2", 224, 256, 518)["size"] == {"shortest_edge": 592}
    assert processor_overrides("dinov3", 224, None, 256) == {"size": {"height": 256, "width": 256}}
    # Its own size, or none asked for: the processor as it is.
    assert processor_overrides("dinov2", 224, 256, 224) == processor_overrides("dinov3", 224, None, None) == {}


def test_a_resolution_off_the_patch_grid_names_the_nearest_ones():
    assert resolution_error(230, 14, "m") == ("--resolution 230 is not a multiple of the patch size 14 of m: "
                                              "use 224 or 238")
    assert resolution_error(10, 16, "m").endswith("use 16")


def test_refusals_read_from_a_local_config(tmp_path, tiny_model, monkeypatch):
    check_model_up_front(tiny_model, 448)  # a multiple of 14: nothing to refuse
    with pytest.raises(UsageError, match="--resolution 256 is not a multiple of the patch size 14 of .*: use 252 "
                                         "or 266"):
        check_model_up_front(tiny_model, 256)
    dinov3 = tmp_path / "d3"
    dinov3.mkdir()
    (dinov3 / "config.json").write_text(json.dumps({"model_type": "dinov3_vit", "patch_size": 16}))
    monkeypatch.setitem(sys.modules, "torchvision", None)  # not installed, as importlib sees it
    with pytest.raises(UsageError, match=r"is a DINOv3, .* torchvision, which is not installed here: "
                                         r"pip install 'dinov2-feature-pyramids\[dinov3\]'"):
        check_model_up_front(dinov3, None)
    # What config.json cannot say is left to the model's loading: a hub id not in the cache, no config at all.
    assert peek_config("facebok/not-a-model-here") is None and peek_config(tmp_path / "none") is None
    check_model_up_front("facebok/not-a-model-here", 230)


def test_the_extractor_refuses_a_dinov3_without_torchvision_before_torch_loads(tmp_path, tiny_dinov3):
    """One line, exit 2, in a fraction of a second, the output directory left as it was (this test runs in both
    of .ci/run's passes: torchvision is hidden where it is installed)."""
    images = tmp_path / "images"
    write_images(images, 1)
    code = ("import sys; sys.modules['torchvision'] = None\n"  # importlib.util.find_spec then says: not installed
            "from pyramid.extract import get_args_parser, main\n"
            f"status = main(get_args_parser().parse_args(['--input_dir', {str(images)!r}, '--output_dir', "
            f"{str(tmp_path / 'out')!r}, '--model', {str(tiny_dinov3)!r}]))\n"
            "print('torch' in sys.modules, file=sys.stderr); sys.exit(status)")
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    lines = result.stderr.splitlines()
    assert result.returncode == 2, result.stderr
    assert lines[0] == (f"error: {tiny_dinov3} is a DINOv3, whose image processor (DINOv3ViTImageProcessor) exists "
                        f"only with torchvision, which is not installed here: pip install "
                        f"'dinov2-feature-pyramids[dinov3]' (or pip install torchvision, the build for your torch)")
    assert lines[1:] == ["False"]  # torch never loaded
    assert not (tmp_path / "out").exists()
    assert time.monotonic() - started < 30


@pytest.mark.skipif(TORCHVISION, reason="the refusal of a real missing torchvision is tested where it is missing "
                                        "(the suite's first pass); hidden in the test above where installed")
def test_without_torchvision_the_cli_says_what_to_install(tmp_path, tiny_dinov3):
    images = tmp_path / "images"
    write_images(images, 1)
    result = warm.run([sys.executable, str(REPO / "extract_distributed.py"), "--input_dir", images,
                             "--output_dir", tmp_path / "out", "--model", tiny_dinov3],
                      capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert "pip install 'dinov2-feature-pyramids[dinov3]'" in result.stderr
