"""pyramid/decode.py: the contract's input rules, broken files as records, the processor's own pixels."""

import importlib.util
import io
import json
import os
import struct
import subprocess
import sys
import time
import warnings
import zlib

import cv2  # OpenCV's own libjpeg-turbo and libwebp: the independent reference for JPEG and WebP
import numpy as np
import png  # pypng: a pure-Python PNG reader and writer, the independent reference for PNG
import pytest
import torch
from PIL import Image, ImageOps

from conftest import KNOWN_IMAGE, REPO, needs_torchvision, run_cli, write_images
from pyramid import decode
from pyramid.decode import (
    EXIF_ORIENTATION,
    PNG_SIGNATURE,
    PYSPNG_MISSING,
    DecoderMissing,
    ImageDataset,
    ImageTooLarge,
    Preprocess,
    collate,
    exif_orientation,
    load_rgb,
    scale_16_to_8,
)

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


def test_scale_16_to_8_divides_by_257_and_rounds():
    assert scale_16_to_8([0, 257, 65535, 128, 129, 385, 386]).tolist() == [0, 1, 255, 0, 1, 1, 2]


def test_16bit_grey_png_is_scaled_not_clipped(tmp_path):
    grey = RNG.integers(0, 65536, size=(9, 11), dtype=np.uint16)
    path = tmp_path / "g16.png"
    path.write_bytes(png_16bit(grey))
    pixels = np.asarray(load_rgb(path))
    expected = np.round(grey / 257).astype(np.uint8)
    assert pixels.shape == (9, 11, 3)
    assert np.array_equal(pixels[..., 0], expected) and np.array_equal(pixels[..., 2], expected)


def test_16bit_rgb_png_is_scaled_by_257(tmp_path):
    rgb = RNG.integers(0, 65536, size=(6, 5, 3), dtype=np.uint16)
    path = tmp_path / "rgb16.png"
    path.write_bytes(png_16bit(rgb))
    assert np.array_equal(np.asarray(load_rgb(path)), np.round(rgb / 257).astype(np.uint8))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "1"])
def test_8bit_png_modes_become_the_same_rgb_as_pillows(tmp_path, mode):
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

    processor = AutoImageProcessor.from_pretrained(tiny_model, backend="pil")
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

    processor = AutoImageProcessor.from_pretrained(tiny_model, backend="pil")
    preprocess = Preprocess(processor)
    assert preprocess.direct is not None  # the dinov2 config takes the direct path
    image = Image.fromarray(RNG.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))
    expected = processor(images=image, do_rescale=False, do_normalize=False, return_tensors="pt")["pixel_values"][0]
    assert torch.equal(preprocess(image), expected)


def test_direct_path_is_refused_when_it_disagrees(tiny_model, monkeypatch):
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(tiny_model, backend="pil")
    monkeypatch.setattr(Preprocess, "_resize_and_crop", lambda self, image: torch.zeros(3, 224, 224, dtype=torch.uint8))
    preprocess = Preprocess(processor)
    assert preprocess.direct is None
    assert preprocess(Image.open(KNOWN_IMAGE).convert("RGB")).float().std() > 10  # the processor's own pixels


# --- Every valid PNG, against pypng -----------------------------------------------------------------
# pypng is pure Python: it shares no code with libspng (pyspng) or Pillow. It writes each test file
# and decodes it again; the contract's conversion of its raw samples is written out in `contract_rgb`.

PNG_KINDS = {  # colour type: (samples per pixel, the bit depths the PNG spec allows)
    "grey": (1, (1, 2, 4, 8, 16)),
    "rgb": (3, (8, 16)),
    "palette": (1, (1, 2, 4, 8)),
    "grey_alpha": (2, (8, 16)),
    "rgba": (4, (8, 16)),
}
PNG_SIZES = ((1, 1), (7, 3), (3, 7), (33, 17))  # (width, height): odd, smaller than one Adam7 block, larger


def png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def pypng_file(kind, depth, width, height, interlace, ancillary, rng):
    """(PNG bytes written by pypng, the samples written (H, W, samples per pixel), the palette or None).

    With `ancillary`: a gAMA chunk, an sBIT chunk (significant bits below the depth), and a tRNS chunk
    where the colour type allows one (grey, RGB: a colour the image holds; palette: alpha entries)."""
    planes = PNG_KINDS[kind][0]
    samples = rng.integers(0, 2 ** depth, size=(height, width, planes))
    palette, options = None, {}
    if kind == "palette":
        colours = [tuple(int(v) for v in colour) for colour in rng.integers(0, 256, size=(2 ** depth, 3))]
        # Alpha entries (tRNS) must come first; half the entries get one, fully transparent ones included.
        palette = ([colour + (int(a),) for colour, a in zip(colours[:len(colours) // 2 or 1], [0, 128] * 128)]
                   + colours[len(colours) // 2 or 1:]) if ancillary else colours
    elif ancillary and kind in ("grey", "rgb"):
        options["transparent"] = tuple(int(v) for v in samples[0, 0])
    if ancillary:
        options["gamma"] = 0.45455  # what a decoder that applied gamma would change every pixel for
    writer = png.Writer(width, height, greyscale=kind in ("grey", "grey_alpha"), alpha=kind in ("grey_alpha", "rgba"),
                        bitdepth=depth, palette=palette, interlace=interlace, **options)
    buffer = io.BytesIO()
    writer.write(buffer, samples.reshape(height, width * planes).tolist())
    data = buffer.getvalue()
    if ancillary:  # sBIT right after IHDR (before PLTE and IDAT, as the spec orders it)
        channels = {"grey": 1, "rgb": 3, "palette": 3, "grey_alpha": 2, "rgba": 4}[kind]
        significant = bytes([5 if kind == "palette" else max(1, depth - 3)] * channels)
        end_of_ihdr = 8 + 8 + 13 + 4
        data = data[:end_of_ihdr] + png_chunk(b"sBIT", significant) + data[end_of_ihdr:]
    return data, samples, palette


def contract_rgb(data):
    """The contract's RGB uint8 (H, W, 3) of a PNG: decoded by pypng, converted here by the input rules.

    pypng's `read` gives the raw samples (no palette lookup, no sBIT or gamma). Then: a palette index
    becomes its entry's RGB; grey is repeated into R, G and B; alpha is dropped; depths 1, 2 and 4 are
    expanded to 8 bits as Pillow does (value * 255 / (2**depth - 1): 1 -> 255, 2 -> 85, 4 -> 17 per step);
    16 bits become round(value / 257)."""
    width, height, rows, info = png.Reader(bytes=data).read()
    samples = np.array([np.asarray(row, dtype=np.int64) for row in rows]).reshape(height, width, info["planes"])
    depth = info["bitdepth"]
    if "palette" in info:
        return np.array([entry[:3] for entry in info["palette"]], dtype=np.uint8)[samples[..., 0]], samples
    colour = samples[..., :1].repeat(3, axis=-1) if info["greyscale"] else samples[..., :3]
    if depth == 16:
        return np.floor(colour / 257 + 0.5).astype(np.uint8), samples  # no ties: 257 is odd
    return (colour * (255 // (2 ** depth - 1))).astype(np.uint8), samples


PNG_CASES = [(kind, depth, interlace) for kind, (_, depths) in PNG_KINDS.items() for depth in depths
             for interlace in (False, True)]


@pytest.mark.parametrize("kind, depth, interlace", PNG_CASES, ids=lambda v: str(v))
def test_every_valid_png_gives_the_contract_pixels(tmp_path, kind, depth, interlace):
    """Each colour type at each depth it allows, interlaced or not, with and without tRNS, gAMA and
    sBIT, at odd sizes: load_rgb gives pypng's samples converted by the input rules, exactly."""
    rng = np.random.default_rng([depth, len(kind), interlace])
    for width, height in PNG_SIZES:
        for ancillary in (False, True):
            case = f"{kind} {depth}-bit {width}x{height} interlace={interlace} ancillary={ancillary}"
            data, written, palette = pypng_file(kind, depth, width, height, interlace, ancillary, rng)
            path = tmp_path / f"{width}x{height}_{ancillary}.png"
            path.write_bytes(data)
            expected, samples = contract_rgb(data)
            assert np.array_equal(samples, written), f"pypng does not read back what it wrote: {case}"
            image = load_rgb(path)
            assert image.mode == "RGB" and image.size == (width, height), case
            got = np.asarray(image)
            assert np.array_equal(got, expected), f"{case}: {np.argwhere(got != expected)[:3].tolist()}"



@pytest.mark.parametrize("kind", ["grey_alpha", "rgb", "rgba", "grey"])
def test_16bit_png_with_exif_orientation_keeps_its_16_bits(tmp_path, kind):
    """An eXIf chunk once sent a PNG to Pillow, which truncates 16-bit colour to its high byte."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    payload = exif.tobytes()
    payload = payload[6:] if payload.startswith(b"Exif\0\0") else payload  # eXIf holds the TIFF part alone
    data, _, _ = pypng_file(kind, 16, 7, 3, False, False, np.random.default_rng(16))
    end_of_ihdr = 8 + 8 + 13 + 4
    path = tmp_path / "oriented.png"
    path.write_bytes(data[:end_of_ihdr] + png_chunk(b"eXIf", payload) + data[end_of_ihdr:])
    expected, _ = contract_rgb(data)
    assert np.array_equal(np.asarray(load_rgb(path)), oriented(expected, 6))

# --- JPEG, WebP, BMP against decoders that are not Pillow's ------------------------------------------
# Tolerances, measured here (Pillow 13, opencv-python-headless 5.0): OpenCV's JPEG and WebP decoders
# give Pillow's pixels exactly (max difference 0 on every file below, lossy ones included). Other
# builds of libjpeg may round the IDCT or upsampling differently, so lossy formats are held to
# LOSSY_TOLERANCE levels; a wrong input rule (orientation, CMYK, alpha) is off by far more.
# Lossless WebP and BMP must be exact.
LOSSY_TOLERANCE = 2
CV_STORED = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION  # the stored pixels, as BGR
ODD_SIZES = ((1, 1), (7, 3), (33, 17))  # (width, height)


def textured_rgb(height, width, seed):
    """uint8 (H, W, 3): gradients (any turn or mirror changes them) plus noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + 2 * y) * 7 % 256], -1)
    return (pixels + rng.integers(0, 30, size=pixels.shape)).clip(0, 255).astype(np.uint8)


def opencv_rgb(data):
    """RGB (H, W, 3) int64 of image bytes as OpenCV decodes them, EXIF orientation NOT applied, alpha dropped."""
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if pixels.ndim == 3 and pixels.shape[-1] == 4:  # WebP with alpha: BGRA
        return pixels[..., 2::-1].astype(np.int64)
    return cv2.imdecode(np.frombuffer(data, np.uint8), CV_STORED)[..., ::-1].astype(np.int64)


def saved(image, tmp_path, name, **options):
    path = tmp_path / name
    image.save(path, **options)
    return path


def assert_close(path, expected, tolerance, case):
    got = np.asarray(load_rgb(path)).astype(np.int64)
    assert got.shape == expected.shape, (case, got.shape, expected.shape)
    difference = np.abs(got - expected).max()
    assert difference <= tolerance, f"{case}: differs by {difference} levels"


@pytest.mark.parametrize("kind", ["rgb", "rgb_444", "rgb_q60", "progressive", "grey", "grey_progressive"])
def test_jpeg_kinds_match_opencv(tmp_path, kind):
    for width, height in ODD_SIZES + ((301, 203),):
        image = Image.fromarray(textured_rgb(height, width, seed=width))
        options = {"quality": 60 if kind == "rgb_q60" else 90, "progressive": "progressive" in kind}
        if kind == "rgb_444":
            options["subsampling"] = 0
        path = saved(image.convert("L") if kind.startswith("grey") else image, tmp_path, f"{width}.jpg", **options)
        assert_close(path, opencv_rgb(path.read_bytes()), LOSSY_TOLERANCE, f"{kind} {width}x{height}")


def test_cmyk_jpeg_is_adobe_inverted_cmyk_converted(tmp_path):
    """Pillow (through libjpeg) writes CMYK JPEGs with the Adobe marker and inverted ink, as Photoshop
    does. Two references: the CMYK -> RGB formula written out here, on the ink that the file holds
    (read by Pillow: JPEG has no other 4-channel reader here), exact; and OpenCV's own conversion, which
    divides by 256 instead of 255 (k - (255 - c) * k >> 8) and so is up to 2 levels off (measured: 2)."""
    for width, height in ODD_SIZES + ((301, 203),):
        cmyk = np.random.default_rng(width).integers(0, 256, size=(height, width, 4), dtype=np.uint8)
        path = saved(Image.fromarray(cmyk, "CMYK"), tmp_path, f"{width}.jpg", quality=95)
        data = path.read_bytes()
        assert b"Adobe" in data and np.abs(  # the stored ink is the inverse of the ink: Adobe's convention
            np.asarray(Image.open(path)).astype(int) - cmyk).mean() < 12
        ink = np.asarray(Image.open(path)).astype(np.int64)  # (H, W, 4) C, M, Y, K as 0 = no ink
        by_formula = np.floor((255 - ink[..., :3]) * (255 - ink[..., 3:]) / 255 + 0.5)  # no ties: /255 of ints
        assert_close(path, by_formula, 0, f"CMYK formula {width}x{height}")
        assert_close(path, opencv_rgb(data), 2, f"CMYK OpenCV {width}x{height}")


def oriented(stored, orientation):
    """The displayed image (H', W', C) of stored pixels (H, W, C) by EXIF tag 0x0112, written from the
    EXIF spec's words for where the stored 0th row and 0th column go, with display indices (i, j)."""
    h, w = stored.shape[:2]
    rows, cols = (h, w) if orientation <= 4 else (w, h)
    i, j = np.mgrid[0:rows, 0:cols]
    source = {  # (stored row, stored column) shown at display (i, j)
        1: (i, j),  # 0th row at the top, 0th column at the left
        2: (i, w - 1 - j),  # 0th row top, 0th column right: mirrored left-right
        3: (h - 1 - i, w - 1 - j),  # 0th row bottom, 0th column right: turned 180
        4: (h - 1 - i, j),  # 0th row bottom, 0th column left: mirrored top-bottom
        5: (j, i),  # 0th row left, 0th column top: transposed
        6: (h - 1 - j, i),  # 0th row right, 0th column top: turned 90 clockwise to view
        7: (h - 1 - j, w - 1 - i),  # 0th row right, 0th column bottom: transverse
        8: (j, w - 1 - i),  # 0th row left, 0th column bottom: turned 90 anticlockwise to view
    }[orientation]
    return stored[source]


@pytest.mark.parametrize("fmt", ["jpeg", "webp_lossless"])
def test_all_eight_exif_orientations(tmp_path, fmt):
    stored = textured_rgb(17, 33, seed=5)  # not square: a turn changes the shape
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = orientation
        if fmt == "jpeg":
            path = saved(Image.fromarray(stored), tmp_path, f"{orientation}.jpg", exif=exif, quality=90)
            decoded = opencv_rgb(path.read_bytes())  # the stored pixels after JPEG's loss
            # The spec's transform above agrees with OpenCV's own (which applies the tag by default):
            opencv_view = cv2.imdecode(np.frombuffer(path.read_bytes(), np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
            assert np.array_equal(oriented(decoded, orientation), opencv_view), orientation
            assert_close(path, oriented(decoded, orientation), LOSSY_TOLERANCE, f"jpeg orientation {orientation}")
        else:
            path = saved(Image.fromarray(stored), tmp_path, f"{orientation}.webp", exif=exif, lossless=True)
            assert np.array_equal(opencv_rgb(path.read_bytes()), stored)
            assert_close(path, oriented(stored.astype(np.int64), orientation), 0, f"webp orientation {orientation}")


@pytest.mark.parametrize("kind", ["lossy", "lossless", "lossy_alpha", "lossless_alpha"])
def test_webp_kinds_match_opencv(tmp_path, kind):
    for width, height in ODD_SIZES + ((301, 203),):
        rgb = textured_rgb(height, width, seed=width)
        alpha = np.random.default_rng(1).integers(0, 256, size=(height, width, 1), dtype=np.uint8)
        alpha[::2] = 0  # fully transparent rows keep their colour: alpha is dropped, not composited
        image = Image.fromarray(np.concatenate([rgb, alpha], -1) if "alpha" in kind else rgb)
        options = {"lossless": True, "exact": True} if kind.startswith("lossless") else {"quality": 80}
        path = saved(image, tmp_path, f"{width}.webp", **options)
        reference = opencv_rgb(path.read_bytes())
        if kind.startswith("lossless"):
            assert np.array_equal(reference, rgb), "OpenCV does not give the pixels written"
            assert_close(path, reference, 0, f"{kind} {width}x{height}")
        else:
            assert_close(path, reference, LOSSY_TOLERANCE, f"{kind} {width}x{height}")


def bmp_rgb(data):
    """RGB uint8 (H, W, 3) of an uncompressed BMP, read here in pure Python from Microsoft's layout:
    BITMAPINFOHEADER or its V4/V5 extensions; 1, 4, 8 bits (palette of B, G, R, reserved), 24 bits
    (B, G, R), 32 bits (B, G, R, X, or BI_BITFIELDS masks; alpha dropped); rows padded to 4 bytes,
    stored bottom-up unless the height is negative."""
    assert data[:2] == b"BM"
    pixel_offset, header_size = struct.unpack_from("<I", data, 10)[0], struct.unpack_from("<I", data, 14)[0]
    width, height, _, bits, compression, _, _, _, colours_used = struct.unpack_from("<iiHHIIiiI", data, 18)
    masks = (0x00FF0000, 0x0000FF00, 0x000000FF)
    if compression == 3:  # BI_BITFIELDS: R, G, B masks after the 40-byte header (inside it from V4 on)
        masks = struct.unpack_from("<III", data, 54)
    else:
        assert compression == 0, "compressed BMPs are not read here"
    top_down, height = height < 0, abs(height)
    stride = (width * bits + 31) // 32 * 4
    palette = None
    if bits <= 8:
        count = colours_used or 2 ** bits
        entries = struct.unpack_from(f"<{4 * count}B", data, 14 + header_size)
        palette = [(entries[4 * k + 2], entries[4 * k + 1], entries[4 * k]) for k in range(count)]
    image = []
    for row in range(height):
        start = pixel_offset + row * stride
        line = data[start:start + stride]
        pixels = []
        for x in range(width):
            if bits <= 8:
                bit = x * bits
                index = (line[bit // 8] >> (8 - bits - bit % 8)) & (2 ** bits - 1)
                pixels.append(palette[index])
            elif bits == 24:
                b, g, r = line[3 * x:3 * x + 3]
                pixels.append((r, g, b))
            else:
                value = struct.unpack_from("<I", line, 4 * x)[0]
                pixels.append(tuple((value & mask) >> ((mask & -mask).bit_length() - 1) for mask in masks))
        image.append(pixels)
    return np.array(image[::-1] if not top_down else image, dtype=np.uint8).reshape(height, width, 3)


def bmp_bytes(rgba, bits, top_down=False):
    """A 24-bit BMP, or a 32-bit V5 BMP with BI_BITFIELDS masks and alpha as some editors write them,
    from uint8 (H, W, 4); Pillow writes neither top-down rows nor bitfields."""
    height, width = rgba.shape[:2]
    stride = (width * bits + 31) // 32 * 4
    rows = []
    for y in range(height):
        if bits == 24:
            line = rgba[y, :, 2::-1].tobytes()
        else:
            line = rgba[y, :, [2, 1, 0, 3]].T.copy().tobytes()  # B, G, R, A in memory: masks below
        rows.append(line + b"\0" * (stride - len(line)))
    pixels = b"".join(rows if top_down else rows[::-1])
    if bits == 24:
        header = struct.pack("<IiiHHIIiiII", 40, width, -height if top_down else height, 1, 24, 0, len(pixels),
                             2835, 2835, 0, 0)
    else:
        header = struct.pack("<IiiHHIIiiII", 124, width, -height if top_down else height, 1, 32, 3, len(pixels),
                             2835, 2835, 0, 0)
        header += struct.pack("<IIII", 0x00FF0000, 0x0000FF00, 0x000000FF, 0xFF000000) + b"BGRs" + b"\0" * 48
        header += b"\0" * (124 - len(header))
    offset = 14 + len(header)
    return b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset) + header + pixels


@pytest.mark.parametrize("kind", ["1bit", "8bit_palette", "8bit_grey", "24bit", "32bit", "24bit_top_down",
                                  "32bit_bitfields_alpha"])
def test_bmp_kinds_match_a_plain_reader(tmp_path, kind):
    for width, height in ODD_SIZES + ((37, 21),):
        rgb = textured_rgb(height, width, seed=width)
        alpha = np.random.default_rng(2).integers(0, 256, size=(height, width, 1), dtype=np.uint8)
        rgba = np.concatenate([rgb, alpha], -1)
        path = tmp_path / f"{width}.bmp"
        if kind == "24bit_top_down":
            path.write_bytes(bmp_bytes(rgba, 24, top_down=True))
        elif kind == "32bit_bitfields_alpha":
            path.write_bytes(bmp_bytes(rgba, 32))
        else:
            image = Image.fromarray(rgba if kind == "32bit" else rgb)
            image = {"1bit": image.convert("1"), "8bit_palette": image.quantize(colors=200),
                     "8bit_grey": image.convert("L")}.get(kind, image)
            image.save(path)
        expected = bmp_rgb(path.read_bytes())
        if kind in ("24bit", "32bit", "24bit_top_down", "32bit_bitfields_alpha"):
            assert np.array_equal(expected, rgb), f"the reader does not give the pixels written: {kind}"
        assert_close(path, expected.astype(np.int64), 0, f"{kind} {width}x{height}")


# --- One pixel pipeline, whatever is installed ------------------------------------------------------
# transformers picks the torchvision backend wherever torchvision is installed (every GPU image); its
# resize differs from Pillow's on non-square images. CI runs this file once without torchvision and once
# with it; the tests marked `with_torchvision` run in the second pass.
with_torchvision = pytest.mark.skipif(importlib.util.find_spec("torchvision") is None,
                                      reason="torchvision is not installed (.ci/run's second pass installs it)")
NON_SQUARE = [(1024, 768), (500, 375), (333, 1001), (1000, 200)]


def test_preprocess_refuses_a_processor_that_is_not_pillow_backed():
    class BackendByName:
        """What transformers before 5.4 made of backend="pil": an attribute that says so, not the backend."""
        backend = "pil"

    with pytest.raises(ValueError, match="BackendByName is not a Pillow-backed image processor.*backend=\"pil\""):
        Preprocess(BackendByName())


@with_torchvision
def test_with_torchvision_installed_the_pixels_are_still_pillows(tiny_model):
    from transformers import AutoImageProcessor

    from pyramid.encoder import load_model_info

    default = AutoImageProcessor.from_pretrained(tiny_model)
    assert default.backend == "torchvision"  # what the run would use if it took transformers' default
    with pytest.raises(ValueError, match="not a Pillow-backed image processor"):
        Preprocess(default)
    pillow = AutoImageProcessor.from_pretrained(tiny_model, backend="pil")
    preprocess = Preprocess(load_model_info(tiny_model)[1])
    assert preprocess.direct is not None
    differing = 0
    for width, height in NON_SQUARE:
        image = Image.fromarray(RNG.integers(0, 256, size=(height, width, 3), dtype=np.uint8))
        expected = pillow(images=image, do_rescale=False, do_normalize=False, return_tensors="pt")["pixel_values"][0]
        assert torch.equal(preprocess(image), expected.to(torch.uint8)), (width, height)
        torchvision_pixels = default(images=image, do_rescale=False, do_normalize=False,
                                     return_tensors="pt")["pixel_values"][0]
        differing += not torch.equal(torchvision_pixels.round().to(torch.uint8), expected.to(torch.uint8))
    assert differing == len(NON_SQUARE)  # each shape is one where the backends disagree


# --- Other resolutions and DINOv3: the model's own processor, called with the sizes -------------------------
SHAPES = [(300, 257), (257, 300), (1023, 769), (333, 1001), (1000, 200), (8, 8), (224, 224)]


def test_dinov2_at_448_is_its_processor_called_with_512_and_448(tiny_model):
    """--resolution 448: the processor's own resize and crop called with shortest edge 512 and crop 448, uint8
    equal (the direct Pillow path is taken, checked against it), normalised on the device as before."""
    from transformers import AutoImageProcessor

    from pyramid.encoder import load_model_info

    own = AutoImageProcessor.from_pretrained(tiny_model, backend="pil")
    preprocess = Preprocess(load_model_info(tiny_model, 448)[1])
    assert preprocess.direct is not None
    sizes = {"size": {"shortest_edge": 512}, "crop_size": {"height": 448, "width": 448}}
    for width, height in SHAPES:
        image = Image.fromarray(RNG.integers(0, 256, size=(height, width, 3), dtype=np.uint8))
        expected = own(images=image, return_tensors="pt", **sizes)["pixel_values"]  # (1, 3, 448, 448)
        pixels = preprocess(image)
        crop = own(images=image, do_rescale=False, do_normalize=False, return_tensors="pt", **sizes)["pixel_values"]
        assert pixels.shape == (3, 448, 448) and torch.equal(pixels, crop[0].to(torch.uint8)), (width, height)
        assert torch.allclose(preprocess.normaliser("cpu")(pixels[None]), expected, atol=1e-6), (width, height)


@needs_torchvision
@pytest.mark.parametrize("resolution", [None, 256, 96])
def test_dinov3_pixels_are_its_processors_bit_for_bit(tiny_dinov3, resolution):
    """DINOv3's processor rescales, then resizes the floats (antialiased bilinear): the workers run it whole but
    its normalising, and the device normalises with its arithmetic, (x - mean) / std in float32, so the pixels
    the model sees are equal bit for bit to the processor's own output, on every shape, mirrored too."""
    from transformers import AutoImageProcessor

    from pyramid.encoder import load_model_info

    side = resolution or 224
    own = AutoImageProcessor.from_pretrained(tiny_dinov3)  # transformers' default: its torchvision backend
    sizes = {} if resolution is None else {"size": {"height": side, "width": side}}
    preprocess = Preprocess(load_model_info(tiny_dinov3, resolution)[1], flip=True)
    normalise = preprocess.normaliser("cpu")
    for width, height in SHAPES:
        image = Image.fromarray(RNG.integers(0, 256, size=(height, width, 3), dtype=np.uint8))
        pixels = preprocess(image)  # (2, 3, side, side): the image and its mirror
        assert pixels.shape == (2, 3, side, side) and pixels.dtype == torch.float32
        expected = own(images=[image, ImageOps.mirror(image)], return_tensors="pt", **sizes)["pixel_values"]
        assert torch.equal(normalise(pixels), expected), (width, height)


# --- Decoders: pyspng for PNG or a refusal, never a silent other decoder ---------------------------------

def test_without_pyspng_a_png_is_refused_in_one_line(tmp_path, monkeypatch):
    """Pillow would decode this 8-bit PNG exactly, but a 16-bit one with its high byte only: a PNG is
    pyspng's or nobody's, so the pixels never depend on what is installed."""
    png_path, = write_images(tmp_path, 1, suffix=".png")
    jpeg_path, = write_images(tmp_path / "j", 1, suffix=".jpg")
    monkeypatch.setattr(decode, "pyspng", None)
    with pytest.raises(DecoderMissing) as error:
        load_rgb(png_path)
    assert str(error.value) == PYSPNG_MISSING and "pip install pyspng" in PYSPNG_MISSING and "\n" not in PYSPNG_MISSING
    with pytest.raises(DecoderMissing):
        decode.decoders()
    assert load_rgb(jpeg_path).size == (64, 48)  # Pillow's formats need no pyspng
    item = ImageDataset(tmp_path, [png_path.name], lambda image: image)[0]
    assert item[1] is None and item[2] == f"DecoderMissing: {PYSPNG_MISSING}"


def hide_module(tmp_path, name):
    """A PYTHONPATH entry that makes `import name` fail in a subprocess, as where it is not installed."""
    shadow = tmp_path / f"hide_{name}"
    (shadow / name).mkdir(parents=True)
    (shadow / name / "__init__.py").write_text(f"raise ImportError('{name} is hidden by the test')\n")
    return str(shadow)


def test_the_extractor_refuses_to_run_without_pyspng(tmp_path, tiny_model):
    write_images(tmp_path / "in", 1, suffix=".jpg")  # refused even without a PNG: the decoders are recorded
    result = run_cli("--input_dir", tmp_path / "in", "--output_dir", tmp_path / "out", "--model", tiny_model,
                     env={"PYTHONPATH": hide_module(tmp_path, "pyspng")})
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"error: {PYSPNG_MISSING}"
    assert not (tmp_path / "out" / "manifest.json").exists() and not list(tmp_path.glob("out/*.pt"))


# --- Orientation: as Pillow's getexif() reads it, for every format --------------------------------------

def with_chunks(data, before=(), after=()):
    """PNG bytes with (type, data) chunks put right after IHDR (before the image data) and before IEND."""
    end_of_ihdr = 8 + 8 + 13 + 4
    iend = data.rindex(b"IEND") - 4
    made = lambda chunks: b"".join(png_chunk(kind, body) for kind, body in chunks)  # noqa: E731
    return data[:end_of_ihdr] + made(before) + data[end_of_ihdr:iend] + made(after) + data[iend:]


def exif_bytes(orientation):
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    return exif.tobytes()  # b"Exif\0\0" + the TIFF structure


def raw_profile(orientation):
    """ImageMagick's "Raw profile type exif" text: a blank line, the profile name, the byte count, hex lines."""
    payload = exif_bytes(orientation)
    hexed = payload.hex()
    lines = "\n".join(hexed[i:i + 72] for i in range(0, len(hexed), 72))
    return f"\nexif\n{len(payload):8d}\n{lines}\n".encode()


def xmp(orientation, element=False):
    tag = (f"<tiff:Orientation>{orientation}</tiff:Orientation>" if element
           else f'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="{orientation}"/>')
    return (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
            + tag.encode() + b"</rdf:RDF></x:xmpmeta>")


def text(kind, keyword, value, compressed=False):
    """A (type, data) tEXt, zTXt or iTXt chunk (iTXt compressed or not)."""
    if kind == b"tEXt":
        return kind, keyword + b"\0" + value
    if kind == b"zTXt":
        return kind, keyword + b"\0\0" + zlib.compress(value)
    return kind, keyword + b"\0" + bytes([compressed, 0]) + b"\0\0" + (zlib.compress(value) if compressed else value)


RAW = b"Raw profile type exif"
XMP_KEY = b"XML:com.adobe.xmp"
PNG_ORIENTATION_CASES = {  # name: (chunks before the image data, chunks after it); None: no orientation
    "none": ((), ()),
    "eXIf": (((b"eXIf", exif_bytes(6)[6:]),), ()),
    "eXIf after the image data": ((), ((b"eXIf", exif_bytes(8)[6:]),)),
    "raw profile in tEXt": ((text(b"tEXt", RAW, raw_profile(6)),), ()),
    "raw profile in zTXt after the image data": ((), (text(b"zTXt", RAW, raw_profile(3)),)),
    "raw profile in compressed iTXt": ((text(b"iTXt", RAW, raw_profile(5), compressed=True),), ()),
    "EXIF bytes in tEXt 'exif'": ((text(b"tEXt", b"exif", exif_bytes(7)),), ()),
    "XMP in iTXt": ((text(b"iTXt", XMP_KEY, xmp(6)),), ()),
    "XMP element in compressed iTXt after the image data": ((), (text(b"iTXt", XMP_KEY, xmp(8, True), True),)),
    "XMP in zTXt": ((text(b"zTXt", XMP_KEY, xmp(2)),), ()),
    "XMP in tEXt": ((text(b"tEXt", XMP_KEY, xmp(4)),), ()),
    "eXIf wins over XMP": (((b"eXIf", exif_bytes(3)[6:]), text(b"iTXt", XMP_KEY, xmp(6))), ()),
    "decoys: other keywords": ((text(b"tEXt", b"Comment", xmp(6)), text(b"zTXt", b"Raw profile type iptc",
                                                                         raw_profile(6))), ()),
}


def pillow_orientation(data):
    """The reference: Pillow's own getexif() of freshly opened bytes."""
    with Image.open(io.BytesIO(data)) as opened:
        return opened.getexif().get(EXIF_ORIENTATION, 1)


@pytest.mark.parametrize("case", PNG_ORIENTATION_CASES)
def test_png_orientation_is_read_as_pillows_getexif_reads_it(tmp_path, case):
    stored = textured_rgb(9, 14, seed=3)  # not square: a turn changes the shape
    before, after = PNG_ORIENTATION_CASES[case]
    buffer = io.BytesIO()
    Image.fromarray(stored).save(buffer, "PNG")
    data = with_chunks(buffer.getvalue(), before, after)
    path = tmp_path / "oriented.png"
    path.write_bytes(data)
    expected = pillow_orientation(data)
    assert (expected == 1) == (case == "none" or case.startswith("decoys")), expected  # the corpus means it
    assert np.array_equal(np.asarray(load_rgb(path)), oriented(stored, expected))
    assert exif_orientation(data) == expected


@pytest.mark.parametrize("fmt, metadata", [("jpeg", "exif"), ("jpeg", "xmp"), ("jpeg", "exif and xmp"),
                                           ("webp", "xmp"), ("webp", "exif"), ("bmp", "none")])
def test_other_formats_orientation_is_pillows_getexif(tmp_path, fmt, metadata):
    stored = textured_rgb(9, 14, seed=4)
    options = {"jpeg": {"quality": 95}, "webp": {"lossless": True}, "bmp": {}}[fmt]
    if "exif" in metadata:
        options["exif"] = exif_bytes(6)
    if "xmp" in metadata:
        options["xmp"] = xmp(8)
    path = saved(Image.fromarray(stored), tmp_path, f"oriented.{fmt}", **options)
    expected = pillow_orientation(path.read_bytes())
    assert expected == {"none": 1, "xmp": 8}.get(metadata, 6)
    reference = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    assert np.array_equal(np.asarray(load_rgb(path)), np.asarray(reference))
    assert exif_orientation(path.read_bytes()) == expected


def test_a_png_without_orientation_chunks_is_never_opened_by_pillow(tmp_path, monkeypatch):
    """Pillow's getexif() of a PNG without eXIf before the image data decodes the whole image: the chunk
    headers say at once that no chunk can hold an orientation."""
    stored = textured_rgb(9, 14, seed=5)
    buffer = io.BytesIO()
    Image.fromarray(stored).save(buffer, "PNG")
    data = with_chunks(buffer.getvalue(), *PNG_ORIENTATION_CASES["decoys: other keywords"])
    (tmp_path / "plain.png").write_bytes(data)

    def no_pillow(*args, **kwargs):
        raise AssertionError("Pillow opened a PNG that holds no orientation")

    monkeypatch.setattr(decode.Image, "open", no_pillow)
    assert exif_orientation(data) == 1
    assert np.array_equal(np.asarray(load_rgb(tmp_path / "plain.png")), stored)


# --- --max_pixels: read from the header, before any decoding ------------------------------------------

def bilevel_png(width, height):
    """A valid all-black 1-bit grey PNG, written without holding its pixels: 40000x40000 is about 200 KB.

    The zlib stream is one raw deflate block of 200 rows, full-flushed (so every copy compresses alike),
    repeated; then the end block and the Adler-32 of all the rows."""
    row = b"\0" * (1 + (width + 7) // 8)  # filter byte 0, then the bits
    rows_per_block = 200
    assert height % rows_per_block == 0
    block = row * rows_per_block
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    compressed = deflate.compress(block) + deflate.flush(zlib.Z_FULL_FLUSH)
    checksum = 1
    for _ in range(height // rows_per_block):
        checksum = zlib.adler32(block, checksum)
    stream = (b"\x78\xda" + compressed * (height // rows_per_block) + deflate.flush(zlib.Z_FINISH)
              + struct.pack(">I", checksum))
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return PNG_SIGNATURE + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", stream) + png_chunk(b"IEND", b"")


def test_bilevel_png_is_a_valid_png(tmp_path):
    (tmp_path / "small.png").write_bytes(bilevel_png(37, 400))
    assert np.array_equal(np.asarray(load_rgb(tmp_path / "small.png")), np.zeros((400, 37, 3), np.uint8))
    width, height, rows, _ = png.Reader(filename=tmp_path / "small.png").read()  # checks CRCs and the zlib stream
    assert (width, height) == (37, 400) and sum(1 for _ in rows) == 400


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".webp", ".bmp"])
def test_max_pixels_is_checked_from_the_header_for_every_decoder(tmp_path, suffix, monkeypatch):
    path, = write_images(tmp_path, 1, size=(64, 48), suffix=suffix)
    assert load_rgb(path, max_pixels=64 * 48).size == (64, 48)
    with pytest.raises(ImageTooLarge, match=r"^64x48 is 3072 pixels, more than --max_pixels 3071 \(read from its "):
        load_rgb(path, max_pixels=64 * 48 - 1)
    # Pillow's own limit is the default; Pillow's check never refuses an image --max_pixels lets through.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageTooLarge, match="more than --max_pixels 2000"):
        load_rgb(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning either
        assert load_rgb(path, max_pixels=10_000).size == (64, 48)
    assert Image.MAX_IMAGE_PIXELS == 1000  # restored for everyone else


def test_max_pixels_defaults_to_pillows_limit_and_must_be_positive(tmp_path):
    from pyramid.exits import UsageError
    from pyramid.extract import check_args, get_args_parser

    args = get_args_parser().parse_args(["--input_dir", str(tmp_path)])
    check_args(args)
    assert args.max_pixels == decode.pillow_pixel_limit() == 2 * Image.MAX_IMAGE_PIXELS
    with pytest.raises(UsageError, match="^--max_pixels must be at least 1, not 0$"):
        check_args(get_args_parser().parse_args(["--input_dir", str(tmp_path), "--max_pixels", "0"]))


# Runs a command and prints, last on stderr, the peak RSS (KiB) of every process it started and waited for: the
# extractor and its decode workers.
WITH_PEAK_RSS = ("import resource, subprocess, sys; status = subprocess.call(sys.argv[1:]); "
                 "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(status)")


def test_a_huge_png_is_a_failure_in_a_moment(tmp_path, tiny_model):
    """A 200 KB valid PNG of 40000 x 40000 pixels (1.6 gigapixels): once decoded in 82 s and 11.4 GB by a
    worker. Refused from its IHDR: the run writes the others and exits 3."""
    write_images(tmp_path / "in", 2, size=(64, 48))
    (tmp_path / "in" / "huge.png").write_bytes(bilevel_png(40000, 40000))
    assert (tmp_path / "in" / "huge.png").stat().st_size < 300_000
    started = time.monotonic()
    with pytest.raises(ImageTooLarge):
        load_rgb(tmp_path / "in" / "huge.png")
    assert time.monotonic() - started < 1
    result = subprocess.run([sys.executable, "-c", WITH_PEAK_RSS, sys.executable, REPO / "extract_distributed.py",
                             "--input_dir", tmp_path / "in", "--output_dir", tmp_path / "out", "--model", tiny_model,
                             "--num_workers", "1"], cwd=REPO, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert result.returncode == 3, result.stderr
    assert sorted(p.name for p in (tmp_path / "out").glob("*.pt")) == ["00000.pt", "00001.pt"]
    failures = [json.loads(line) for line in (tmp_path / "out" / "failures.jsonl").read_text().splitlines()]
    assert [(failure["path"], failure["error"]) for failure in failures] == [
        ("huge.png", "ImageTooLarge: 40000x40000 is 1600000000 pixels, more than --max_pixels 178956970 (read from "
                     "its header; not decoded); raise --max_pixels to decode it")]
    # The extractor and its decode worker stayed far below the 4.8 GB that the decoded image alone would take.
    assert int(result.stderr.splitlines()[-1]) < 3 * 1024 ** 2  # KiB
