"""pyramid/decode.py: the contract's input rules, broken files as records, the processor's own pixels."""

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from pyramid import decode
from pyramid.decode import ImageDataset, Preprocess, collate, load_rgb, scale_16_to_8

from conftest import KNOWN_IMAGE

RNG = np.random.default_rng(0)


def png_16bit(pixels):
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit RGB): grey (H, W) or RGB (H, W, 3) uint16."""
    height, width = pixels.shape[:2]
    color_type = 0 if pixels.ndim == 2 else 2
    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


@pytest.fixture(params=["pyspng", "pillow"])
def decoder(request, monkeypatch):
    """Run each input-rule test through both PNG paths: libspng and Pillow."""
    if request.param == "pillow":
        monkeypatch.setattr(decode, "pyspng", None)
    elif decode.pyspng is None:
        pytest.skip("pyspng is not installed")
    return request.param


def test_scale_16_to_8_divides_by_257_and_rounds():
    assert scale_16_to_8([0, 257, 65535, 128, 129, 385, 386]).tolist() == [0, 1, 255, 0, 1, 1, 2]


def test_16bit_grey_png_is_scaled_not_clipped(tmp_path, decoder):
    grey = RNG.integers(0, 65536, size=(9, 11), dtype=np.uint16)
    path = tmp_path / "g16.png"
    path.write_bytes(png_16bit(grey))
    pixels = np.asarray(load_rgb(path))
    expected = np.round(grey / 257).astype(np.uint8)
    assert pixels.shape == (9, 11, 3)
    assert np.array_equal(pixels[..., 0], expected) and np.array_equal(pixels[..., 2], expected)


def test_16bit_rgb_png_is_scaled_by_257(tmp_path):
    if decode.pyspng is None:
        pytest.skip("16-bit colour PNGs keep their 16 bits only through pyspng")
    rgb = RNG.integers(0, 65536, size=(6, 5, 3), dtype=np.uint16)
    path = tmp_path / "rgb16.png"
    path.write_bytes(png_16bit(rgb))
    assert np.array_equal(np.asarray(load_rgb(path)), np.round(rgb / 257).astype(np.uint8))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "1"])
def test_8bit_png_modes_become_the_same_rgb_on_both_paths(tmp_path, mode, decoder):
    rgba = RNG.integers(0, 256, size=(10, 13, 4), dtype=np.uint8)
    rgba[..., 3][::2] = 0  # fully transparent rows keep their colour: alpha is dropped, not composited
    source = Image.fromarray(rgba[..., :3]) if mode != "RGBA" else Image.fromarray(rgba)
    image = source.convert(mode) if mode not in ("RGBA",) else source
    if mode == "LA":
        image = Image.fromarray(rgba).convert("LA")
    path = tmp_path / f"{mode}.png"
    image.save(path)
    expected = np.asarray(Image.open(path).convert("RGB"))
    pixels = np.asarray(load_rgb(path))
    assert pixels.dtype == np.uint8 and pixels.shape == (10, 13, 3)
    assert np.array_equal(pixels, expected)
    if mode == "RGBA":
        assert np.array_equal(pixels, rgba[..., :3])


def test_cmyk_jpeg_is_converted(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.fromarray(RNG.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)).convert("CMYK").save(path)
    pixels = load_rgb(path)
    assert pixels.mode == "RGB"
    assert np.array_equal(np.asarray(pixels), np.asarray(Image.open(path).convert("RGB")))


def test_exif_orientation_is_applied(tmp_path):
    upright = np.zeros((20, 40, 3), dtype=np.uint8)
    upright[:, :20] = 255  # left half white
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view": stored pixels are the view rotated 90 CCW
    Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90).save(path, exif=exif, quality=95)
    pixels = np.asarray(load_rgb(path)).astype(int)
    assert pixels.shape == (20, 40, 3)
    assert pixels[:, :15].mean() > 240 and pixels[:, 25:].mean() < 15


def test_broken_files_are_failure_records(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(RNG.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)).save(good)
    data = good.read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    jpeg = io.BytesIO()
    Image.fromarray(RNG.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)).save(jpeg, "JPEG")
    (tmp_path / "garbled.jpg").write_bytes(jpeg.getvalue()[:200] + b"\x00" * 50)
    names = ["good.png", "truncated.png", "empty.png", "text.png", "garbled.jpg"]
    dataset = ImageDataset(tmp_path, names, lambda image: torch.from_numpy(np.asarray(image).copy()))
    items = [dataset[i] for i in range(len(names))]
    assert items[0][2] is None and items[0][1].shape == (8, 8, 3)
    for index, pixels, error in items[1:]:
        assert pixels is None and isinstance(error, str) and error, names[index]
    indices, batch, failures = collate(items)
    assert indices.tolist() == [0] and batch.shape == (1, 8, 8, 3)
    assert [index for index, _ in failures] == [1, 2, 3, 4]


def test_preprocess_then_normalise_equals_the_processor(tiny_model):
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(tiny_model)
    image = Image.open(KNOWN_IMAGE)
    expected = processor(images=image, return_tensors="pt")["pixel_values"]  # (1, 3, 224, 224)
    preprocess = Preprocess(processor)
    pixels = preprocess(load_rgb(KNOWN_IMAGE))
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 224, 224)
    normalised = preprocess.normaliser("cpu")(pixels[None])
    assert normalised.dtype == torch.float32
    assert torch.allclose(normalised, expected, atol=1e-5)
    assert normalised.std() > 0.5  # a real image, not a constant


@pytest.mark.parametrize("size", [(1024, 1024), (1024, 768), (481, 640), (8, 8), (1000, 200), (257, 1999)])
def test_direct_resize_and_crop_equals_the_processor(tiny_model, size):
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(tiny_model)
    preprocess = Preprocess(processor)
    assert preprocess.direct is not None  # the dinov2 config takes the direct path
    image = Image.fromarray(RNG.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))
    expected = processor(images=image, do_rescale=False, do_normalize=False, return_tensors="pt")["pixel_values"][0]
    assert torch.equal(preprocess(image), expected)


def test_direct_path_is_refused_when_it_disagrees(tiny_model, monkeypatch):
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(tiny_model)
    monkeypatch.setattr(Preprocess, "_resize_and_crop", lambda self, image: torch.zeros(3, 224, 224, dtype=torch.uint8))
    preprocess = Preprocess(processor)
    assert preprocess.direct is None
    assert preprocess(Image.open(KNOWN_IMAGE).convert("RGB")).float().std() > 10  # the processor's own pixels
