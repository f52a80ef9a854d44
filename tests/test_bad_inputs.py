"""Odd and broken inputs end to end through the CLI: each odd image gives the pyramid of its pixels as
a plain RGB PNG, each broken one is a named failure (exit 3), other files are ignored.

One CLI run covers the whole corpus: the plain RGB PNG references sit in `ref/` beside the odd images.
"""

import base64
import io
import json
import os
import stat
import struct
import zlib

import hostile_names
import numpy as np
import torch
from PIL import Image

from conftest import run_cli
from pyramid.tree import scan_outputs

EXIF_ORIENTATION = 0x0112
# What each broken file must be: a failure named by its relative path, with no output file.
BROKEN = ("broken/truncated.png", "broken/cut_short.jpg", "broken/empty.png", "broken/text.png",
          "broken/garbled.jpg")
NOT_IMAGES = ("notes.txt", "image.png.txt", "data.json", "README", "nested/.DS_Store", "archive.png.zip")


def png_16bit(pixels):
    """PNG bytes of uint16 pixels (H, W) grey, (H, W, 2) grey+alpha or (H, W, 3) RGB; Pillow cannot
    write 16-bit colour."""
    pixels = np.asarray(pixels, dtype=">u2")  # PNG stores samples big-endian
    height, width = pixels.shape[:2]
    colour_type = 0 if pixels.ndim == 2 else {2: 4, 3: 2}[pixels.shape[2]]

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\0" + pixels[y].tobytes() for y in range(height))  # filter type 0 on every row
    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


def smooth_rgb(height, width, seed):
    """uint8 (H, W, 3) with structure at every scale, so a turned or shifted copy gives other features."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1),
                       (x // 4 + y // 3) % 2 * 200], axis=-1)
    return (pixels + rng.integers(0, 40, size=pixels.shape)).clip(0, 255).astype(np.uint8)


def save_png(path, pixels, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode).save(path)


def build_corpus(root):
    """Write the corpus under `root`; return {odd image: its reference PNG}, both relative to `root`."""
    references = {}

    def odd(name, reference_pixels):
        references[name] = f"ref/{name.replace('/', '_')}.png"
        save_png(root / references[name], np.ascontiguousarray(reference_pixels))

    rgb = smooth_rgb(48, 64, seed=1)  # (H, W, 3)
    rng = np.random.default_rng(7)

    grey = rgb[..., 0]
    save_png(root / "grey.png", grey)
    odd("grey.png", np.repeat(grey[..., None], 3, axis=-1))

    palette = Image.fromarray(rgb).quantize(colors=16)
    palette.save(root / "palette.png")
    odd("palette.png", np.asarray(palette.convert("RGB")))

    alpha = rng.integers(0, 256, size=(48, 64, 1), dtype=np.uint8)  # any alpha, dropped, not blended
    save_png(root / "rgba.png", np.concatenate([rgb, alpha], axis=-1))
    odd("rgba.png", rgb)
    Image.fromarray(np.concatenate([grey[..., None], alpha], axis=-1), "LA").save(root / "grey_alpha.png")
    odd("grey_alpha.png", np.repeat(grey[..., None], 3, axis=-1))

    Image.fromarray(rgb).convert("CMYK").save(root / "cmyk.jpg", quality=95)
    cmyk = np.asarray(Image.open(root / "cmyk.jpg")).astype(np.int64)  # (H, W, 4) as decoded
    assert Image.open(root / "cmyk.jpg").mode == "CMYK"
    # CMYK -> RGB written out by hand: each channel (255 - ink) scaled by (255 - black).
    odd("cmyk.jpg", ((255 - cmyk[..., :3]) * (255 - cmyk[..., 3:]) / 255).round().astype(np.uint8))

    # 16-bit: random values, so value >> 8 (truncation) and clipping to 255 both differ from value / 257.
    colour_16 = rng.integers(0, 65536, size=(48, 64, 3))
    (root / "colour_16bit.png").write_bytes(png_16bit(colour_16))
    odd("colour_16bit.png", ((2 * colour_16 + 257) // 514).astype(np.uint8))
    grey_16 = rng.integers(0, 65536, size=(48, 64))
    (root / "grey_16bit.png").write_bytes(png_16bit(grey_16))
    odd("grey_16bit.png", np.repeat(((2 * grey_16 + 257) // 514).astype(np.uint8)[..., None], 3, axis=-1))
    # 16-bit grey+alpha: once refused as broken ("pyspng: could not decode image size: invalid format").
    grey_alpha_16 = np.stack([grey_16[::-1], rng.integers(0, 65536, size=(48, 64))], axis=-1)
    (root / "grey_alpha_16bit.png").write_bytes(png_16bit(grey_alpha_16))
    odd("grey_alpha_16bit.png", np.repeat(((2 * grey_16[::-1] + 257) // 514).astype(np.uint8)[..., None], 3, axis=-1))

    # EXIF orientation 6: the stored pixels are to be turned 90 degrees clockwise for display.
    # The reference turns the decoded stored pixels by hand, so JPEG loss is the same on both sides.
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    Image.fromarray(np.rot90(rgb, k=1)).save(root / "exif_rotated.jpg", quality=95, exif=exif)
    stored = np.asarray(Image.open(root / "exif_rotated.jpg").convert("RGB"))  # (64, 48, 3): as stored
    odd("exif_rotated.jpg", np.rot90(stored, k=-1))
    exif[EXIF_ORIENTATION] = 3  # 180 degrees, in a PNG's eXIf chunk (lossless, another decoding path)
    Image.fromarray(np.rot90(rgb, k=2)).save(root / "exif_turned_180.png", exif=exif)
    odd("exif_turned_180.png", rgb)

    tiny = smooth_rgb(8, 8, seed=2)
    Image.fromarray(tiny).save(root / "tiny_8x8.bmp")
    odd("tiny_8x8.bmp", tiny)
    wide = smooth_rgb(200, 1000, seed=3)
    Image.fromarray(wide).save(root / "wide_1000x200.webp", lossless=True)
    odd("wide_1000x200.webp", wide)

    for name in ("UPPER.PNG", "Mixed.JpEg", "nested/a/b/deep.png", "with space/ünïcödé 画像 x.png"):
        pixels = smooth_rgb(48, 64, seed=len(name))
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / name, format="PNG")  # lossless even where the name says JPEG
        odd(name, pixels)

    (root / "broken").mkdir()
    good_png = (root / "grey.png").read_bytes()
    (root / "broken/truncated.png").write_bytes(good_png[:len(good_png) // 2])
    good_jpeg = (root / "exif_rotated.jpg").read_bytes()
    (root / "broken/cut_short.jpg").write_bytes(good_jpeg[:len(good_jpeg) // 2])
    (root / "broken/empty.png").write_bytes(b"")
    (root / "broken/text.png").write_text("this is not a picture\n")
    # Markers intact, frame header and Huffman tables garbled: the decoder must give up. (Garbled
    # entropy-coded data alone often decodes, with no error from libjpeg or Pillow, into wrong pixels.)
    frame, scan = good_jpeg.index(b"\xff\xc0") + 2, good_jpeg.index(b"\xff\xda")
    garbled = bytearray(good_jpeg)
    garbled[frame:scan] = rng.integers(0, 256, size=scan - frame, dtype=np.uint8).tobytes()
    (root / "broken/garbled.jpg").write_bytes(bytes(garbled))

    for name in NOT_IMAGES:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(good_png if name.endswith(".zip") else b"not an image\n")
    return references


def output_for(name):
    return name[:name.rindex(".")] + ".pt"


def test_odd_images_match_plain_rgb_and_broken_ones_are_named_failures(tmp_path, tiny_model):
    references = build_corpus(tmp_path / "in")
    out = tmp_path / "out"
    result = run_cli("--input_dir", tmp_path / "in", "--output_dir", out, "--model", tiny_model,
                     "--batch_size", 8, "--num_workers", 1)

    assert result.returncode == 3, result.stderr
    odd_images, reference_images = set(references), set(references.values())
    written = {str(p.relative_to(out)) for p in out.rglob("*.pt")}
    assert written == {output_for(name) for name in odd_images | reference_images}  # nothing for broken/ignored
    records = [json.loads(line) for line in (out / "failures.jsonl").read_text(encoding="utf-8").splitlines()]
    assert sorted(record["path"] for record in records) == sorted(BROKEN)
    assert all(record["error"] for record in records)
    for name in BROKEN:
        assert f"failed: {name}: " in result.stderr
    assert "Traceback" not in result.stderr
    summary = [line for line in result.stderr.splitlines() if line.startswith("done: ")][-1]
    assert summary.startswith(f"done: {len(written)} written, 0 skipped (already there), {len(BROKEN)} failed")

    for name, reference in sorted(references.items()):
        got = torch.load(out / output_for(name), weights_only=True)
        want = torch.load(out / output_for(reference), weights_only=True)
        assert list(got) == ["16x16", "8x8", "4x4", "2x2", "1x1"], name
        for key in want:
            assert torch.allclose(got[key], want[key], atol=1e-5), (name, key)


def test_corpus_references_are_not_all_alike(tmp_path):
    """The comparison above can fail: a wrong input rule gives other pixels than its reference."""
    references = build_corpus(tmp_path)

    def pixels(name):
        return np.asarray(Image.open(tmp_path / name).convert("RGB")).astype(np.int64)

    # What a decoder without the rules would see: EXIF ignored, 16 bits truncated, CMYK channels as RGB.
    assert pixels("exif_rotated.jpg").shape != pixels(references["exif_rotated.jpg"]).shape
    assert (pixels("exif_turned_180.png") != pixels(references["exif_turned_180.png"])).mean() > 0.5
    truncated = (np.asarray(Image.open(io.BytesIO((tmp_path / "grey_16bit.png").read_bytes()))) >> 8)
    assert (truncated != pixels(references["grey_16bit.png"])[..., 0]).mean() > 0.2
    assert np.abs(np.asarray(Image.open(tmp_path / "cmyk.jpg"))[..., :3] - pixels(references["cmyk.jpg"])).mean() > 50


def test_odd_names_are_files_or_recorded_failures_never_a_crash_a_hang_or_a_write_outside(tmp_path, tiny_model):
    """One run over hostile names (tests/hostile_names.py): bytes that are not UTF-8, a 250-byte name, images
    named like the tree's own files, a FIFO, a socket and a folder where files go, a folder linked outside."""
    inputs, out, outside = tmp_path / "in", tmp_path / "out", tmp_path / "outside"
    written = ["00000.png", hostile_names.NOT_UTF8_IMAGE, hostile_names.long_name(250), "fifo.png", "sock.png",
               *hostile_names.ORDINARY_IMAGES]
    unwritable = [*hostile_names.TREE_NAMED_IMAGES, "blocked.png", "linked/y.png"]
    for seed, name in enumerate(written + unwritable):
        hostile_names.image(inputs / name, seed=seed)
    hostile_names.broken_image(inputs / hostile_names.NOT_UTF8_BROKEN)
    out.mkdir()
    outside.mkdir()
    (out / "stats.pt").write_bytes(b"the statistics")
    hostile_names.fifo(out / "fifo.pt")
    hostile_names.unix_socket(out / "sock.pt")
    hostile_names.folder(out / "blocked.pt")
    hostile_names.link(out / "linked", outside)
    args = ("--input_dir", inputs, "--output_dir", out, "--model", tiny_model, "--batch_size", 4,
            "--num_workers", 0)

    for attempt in range(2):  # the rerun: the same failures, once each, and only the FIFO's image written again
        if attempt == 1:
            (out / "fifo.pt").unlink()
            hostile_names.fifo(out / "fifo.pt")  # a rerun used to open it to check it, and wait for ever
        result = run_cli(*args, timeout=180)
        assert result.returncode == 3, result.stderr
        assert "Traceback" not in result.stderr
        lines = (out / "failures.jsonl").read_bytes().decode("utf-8").splitlines()  # strict: valid UTF-8
        records = {record["path"]: record for record in map(json.loads, lines)}
        assert sorted(records) == sorted(["bad\\xfe.png", *unwritable])
        assert base64.b64decode(records["bad\\xfe.png"]["path_bytes"]) == b"bad\xfe.png"
        assert "statistics" in records["stats.png"]["error"] and "Is a directory" in records["blocked.png"]["error"]
        assert "symbolic link" in records["linked/y.png"]["error"]
        assert "failed: bad\\xfe.png: " in result.stderr
        run = json.loads((out / "runs.jsonl").read_text(encoding="utf-8").splitlines()[-1])
        assert (run["written"], run["skipped"], run["failed"]) == ((len(written), 0, 8) if attempt == 0
                                                                     else (1, len(written) - 1, 8))
    assert scan_outputs(out)[0] == {output_for(name) for name in written}
    assert all(stat.S_ISREG(os.lstat(out / output_for(name)).st_mode) for name in written)
    assert list(outside.iterdir()) == [] and (out / "stats.pt").read_bytes() == b"the statistics"
    assert not (out / "pack").exists() and (out / "blocked.pt").is_dir()
    assert scan_outputs(out)[1] == []  # no temporary left
