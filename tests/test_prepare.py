"""Tests for pyramid/prepare.py: parquet, folder, zip and (offline) hub sources on real image files."""

import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import warm
from conftest import REPO, write_images
from pyramid import prepare
from pyramid.tree import temporary_name, writer_tag

SHA = "0123456789abcdef0123456789abcdef01234567"


def image_bytes(seed, size=(24, 16), format="PNG", mode="RGB"):
    """Encoded bytes of a random image; PNG unless `format` says otherwise."""
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}[mode]
    pixels = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode).save(buffer, format=format)
    return buffer.getvalue()


def pixels(data_or_path):
    """The decoded pixels of an image file or of encoded bytes, as an array."""
    source = io.BytesIO(data_or_path) if isinstance(data_or_path, bytes) else data_or_path
    with Image.open(source) as image:
        return np.asarray(image)


def write_parquet(path, images):
    """A parquet file in the hub's image layout: an `image` column of {bytes, path} and a `label` column."""
    path.parent.mkdir(parents=True, exist_ok=True)
    column = pa.array([{"bytes": data, "path": f"img{i}.png"} for i, data in enumerate(images)],
                      type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"image": column, "label": pa.array(range(len(images)), pa.int64())}), path,
                   row_group_size=2)
    return path


def run(*argv):
    """prepare.main on these arguments, in this process; the exit status."""
    return prepare.main(prepare.get_args_parser().parse_args([str(a) for a in argv]))


def run_cli(*argv, env=None):
    """`python -m pyramid.prepare ARGS` in a subprocess; the CompletedProcess."""
    return warm.run([sys.executable, "-m", "pyramid.prepare", *map(str, argv)], cwd=REPO,
                    capture_output=True, text=True, timeout=120, env=dict(os.environ, **(env or {})))


def listing(directory):
    """Relative paths of the images in a folder, sorted."""
    return sorted(p.relative_to(directory).as_posix() for p in Path(directory).rglob("*.png"))


@pytest.fixture
def shards(tmp_path):
    """Two hub-layout shards of 3 rows each (PNG and JPEG), and the bytes of all 6 rows in order."""
    rows = [image_bytes(i, format="PNG" if i % 2 == 0 else "JPEG") for i in range(6)]
    write_parquet(tmp_path / "src" / "train-00000-of-00002.parquet", rows[:3])
    write_parquet(tmp_path / "src" / "train-00001-of-00002.parquet", rows[3:])
    return sorted((tmp_path / "src").glob("*.parquet")), rows


def test_parquet_first_n_across_shards_is_lossless(tmp_path, shards):
    paths, rows = shards
    out = tmp_path / "out"
    # Given in reverse: the shards are still read in name order.
    assert run("--source", paths[1], paths[0], "--num_images", 5, "--output_dir", out) == 0
    assert listing(out) == [f"{i:05d}.png" for i in range(5)]
    for i in range(5):
        assert np.array_equal(pixels(out / f"{i:05d}.png"), pixels(rows[i]))
    # A PNG row is kept byte for byte; a JPEG row is decoded once and stored losslessly.
    assert (out / "00000.png").read_bytes() == rows[0]
    assert (out / "00001.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads((out / prepare.RECORD).read_text())
    assert record["source"]["kind"] == "parquet" and record["num_images"] == 5 and record["seed"] is None


def test_folder_keeps_names_and_ignores_other_files(tmp_path):
    src = tmp_path / "src"
    write_images(src, 2, names=["a.png", "sub/b.png"])
    Image.open(src / "sub/b.png").convert("RGB").save(src / "c.JPG")
    (src / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    assert run("--source", src, "--output_dir", out) == 0
    assert listing(out) == ["a.png", "c.png", "sub/b.png"]
    assert np.array_equal(pixels(out / "c.png"), pixels(src / "c.JPG"))
    assert (out / "a.png").read_bytes() == (src / "a.png").read_bytes()


def test_zip_keeps_relative_names_as_png(tmp_path):
    archive = tmp_path / "faces.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("images/00000.png", image_bytes(0))
        zf.writestr("images/00001.jpg", image_bytes(1, format="JPEG"))
        zf.writestr("__MACOSX/images/._00000.png", b"resource fork")
        zf.writestr("images/readme.txt", "not an image")
    out = tmp_path / "out"
    assert run("--source", archive, "--num_images", 10, "--output_dir", out) == 0
    assert listing(out) == ["images/00000.png", "images/00001.png"]
    assert np.array_equal(pixels(out / "images/00001.png"), pixels(image_bytes(1, format="JPEG")))


def test_rerun_is_idempotent_and_resumes_deleted_files(tmp_path, shards, capsys):
    paths, _ = shards
    out = tmp_path / "out"
    assert run("--source", *paths, "--num_images", 4, "--output_dir", out) == 0
    before = {name: ((out / name).read_bytes(), (out / name).stat().st_mtime_ns) for name in listing(out)}
    capsys.readouterr()
    assert run("--source", *paths, "--num_images", 4, "--output_dir", out) == 0
    assert "0 written, 4 skipped" in capsys.readouterr().out
    assert {name: ((out / name).read_bytes(), (out / name).stat().st_mtime_ns) for name in listing(out)} == before
    (out / "00001.png").unlink()
    (out / "00003.png").unlink()
    assert run("--source", *paths, "--num_images", 4, "--output_dir", out) == 0
    assert "2 written, 2 skipped" in capsys.readouterr().out
    assert {name: (out / name).read_bytes() for name in listing(out)} == {n: b for n, (b, _) in before.items()}


def test_broken_image_is_reported_by_name_and_skipped(tmp_path, capsys):
    source = write_parquet(tmp_path / "broken.parquet", [image_bytes(0), b"\x89PNG not really", image_bytes(2)])
    out = tmp_path / "out"
    assert run("--source", source, "--output_dir", out) == 3
    captured = capsys.readouterr()
    assert "failed: row 1 (broken.parquet): ValueError: not an image in any format Pillow reads (it starts with " \
           "b'\\x89PNG not')" in captured.err
    assert "BytesIO" not in captured.err
    assert "2 written, 0 skipped (already there), 1 failed" in captured.out
    assert listing(out) == ["00000.png", "00002.png"]
    # A rerun tries the broken one again and leaves the good ones.
    assert run("--source", source, "--output_dir", out) == 3
    assert "0 written, 2 skipped (already there), 1 failed" in capsys.readouterr().out


def test_resolution_resizes_shortest_edge_bicubic(tmp_path):
    src = tmp_path / "src"
    write_images(src, 1, size=(64, 48))
    out = tmp_path / "out"
    assert run("--source", src, "--resolution", 32, "--output_dir", out) == 0
    with Image.open(src / "00000.png") as original:
        expected = np.asarray(original.resize((42, 32), Image.Resampling.BICUBIC))  # 32 * 64 / 48, truncated
    result = pixels(out / "00000.png")
    assert result.shape == (32, 42, 3)
    assert np.array_equal(result, expected)


def test_exif_orientation_is_applied(tmp_path):
    rotated = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[prepare.EXIF_ORIENTATION] = 6  # stored sideways: the viewer turns it 90 degrees clockwise
    src = tmp_path / "src"
    src.mkdir()
    rotated.save(src / "a.png", exif=exif)
    assert run("--source", src, "--output_dir", tmp_path / "out") == 0
    assert pixels(tmp_path / "out" / "a.png").shape == (24, 16, 3)


def test_second_source_or_other_options_are_refused(tmp_path, shards, capsys):
    paths, _ = shards
    out = tmp_path / "out"
    assert run("--source", *paths, "--num_images", 2, "--output_dir", out) == 0
    before = {name: (out / name).read_bytes() for name in listing(out)}
    folder = tmp_path / "folder"
    write_images(folder, 3)
    capsys.readouterr()
    assert run("--source", folder, "--output_dir", out) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and prepare.RECORD in err and "another --output_dir" in err
    assert run("--source", *paths, "--num_images", 2, "--resolution", 8, "--output_dir", out) == 2
    assert run("--source", *paths, "--num_images", 2, "--seed", 1, "--output_dir", out) == 2
    assert {name: (out / name).read_bytes() for name in listing(out)} == before
    # More images from the same source and options is the same set grown, so it is allowed.
    assert run("--source", *paths, "--num_images", 3, "--output_dir", out) == 0
    assert listing(out) == ["00000.png", "00001.png", "00002.png"]


def test_stale_temporaries_of_dead_runs_are_removed(tmp_path, shards):
    paths, _ = shards
    out = tmp_path / "out"
    assert run("--source", *paths, "--num_images", 1, "--output_dir", out) == 0
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    dead = temporary_name(out / "00001.png", f"{socket.gethostname()}@{finished.pid}.1")
    running = temporary_name(out / "00002.png", writer_tag())
    dead.write_bytes(b"half a png")
    running.write_bytes(b"being written")
    assert run("--source", *paths, "--num_images", 1, "--output_dir", out) == 0
    assert not dead.exists() and running.exists()


def test_folder_of_foreign_images_is_refused(tmp_path, shards, capsys):
    paths, _ = shards
    out = tmp_path / "out"
    write_images(out, 1)
    assert run("--source", *paths, "--output_dir", out) == 2
    assert "did not write" in capsys.readouterr().err


def test_seeded_subset_is_stable_and_nested(tmp_path, shards):
    paths, rows = shards
    assert run("--source", *paths, "--num_images", 3, "--seed", 7, "--output_dir", tmp_path / "a") == 0
    assert run("--source", *paths, "--num_images", 4, "--seed", 7, "--output_dir", tmp_path / "b") == 0
    # The documented rule, written out independently.
    ranked = sorted(range(6), key=lambda row: hashlib.sha256(f"7:{row}".encode()).digest())
    assert listing(tmp_path / "a") == [f"{row:05d}.png" for row in sorted(ranked[:3])]
    assert set(listing(tmp_path / "a")) < set(listing(tmp_path / "b"))
    assert listing(tmp_path / "a") != [f"{i:05d}.png" for i in range(3)]
    for name in listing(tmp_path / "b"):
        assert np.array_equal(pixels(tmp_path / "b" / name), pixels(rows[int(name[:5])]))


def test_first_n_fetches_only_the_shards_it_needs(tmp_path):
    fetched = []
    shards = []
    for index in range(4):
        path = write_parquet(tmp_path / f"train-{index:05d}-of-00004.parquet",
                             [image_bytes(10 * index + j) for j in range(2)])
        shards.append(prepare.Shard(path.name, lambda path=path: fetched.append(path.name) or str(path)))
    source = prepare.ParquetSource(shards, {"kind": "hub", "id": "acme/faces"})
    assert [entry.name for entry in prepare.select(source, 3, None)] == ["00000.png", "00001.png", "00002.png"]
    assert fetched == ["train-00000-of-00004.parquet", "train-00001-of-00004.parquet"]


def test_clashing_names_are_refused(tmp_path, capsys):
    src = tmp_path / "src"
    write_images(src, 2, names=["a.png", "a.jpg"])
    assert run("--source", src, "--output_dir", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "a.jpg" in err and "a.png" in err
    assert not (tmp_path / "out").exists()


def test_every_name_clash_is_named_in_one_run(tmp_path, capsys):
    src = tmp_path / "src"
    write_images(src, 6, names=["a.png", "a.jpg", "ok.png", "b/c.jpeg", "b/c.webp", "b/c.PNG"])
    assert run("--source", src, "--output_dir", tmp_path / "out") == 2
    assert capsys.readouterr().err == (
        "error: 2 name clashes: a.jpg and a.png would all become a.png; b/c.PNG and b/c.jpeg and b/c.webp would all "
        "become b/c.png; rename all but one of each in the source\n")


@pytest.mark.parametrize("argv, words", [
    (["--num_images", "0"], "--num_images must be a positive"),
    (["--source", "missing.zip"], "--source missing.zip is neither"),
    (["--source", "a.parquet", "b.zip"], "only as .parquet files"),
])
def test_bad_arguments_fail_in_one_line(tmp_path, capsys, argv, words):
    assert run(*argv, "--output_dir", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1


def fake_hf_cache(home, repo_id, shard_rows, refs_main=True):
    """An HF cache (HF_HOME layout) holding these parquet shards of a dataset repo at commit SHA."""
    repo = Path(home) / "hub" / f"datasets--{repo_id.replace('/', '--')}"
    if refs_main:
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(SHA)
    total = len(shard_rows)
    for index, rows in shard_rows.items():
        write_parquet(repo / "snapshots" / SHA / "data" / f"train-{index:05d}-of-{total:05d}-ab12.parquet", rows)


def test_hub_unreachable_names_source_and_exits_2(tmp_path):
    result = run_cli("--dataset", "celebahq", "--output_dir", tmp_path / "out",
                     env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty_hf")})
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert prepare.DATASETS["celebahq"] in result.stderr and "--source" in result.stderr
    assert not (tmp_path / "out").exists()


def test_hub_offline_from_cache_reads_the_same_rows(tmp_path):
    rows = [image_bytes(i) for i in range(4)]
    fake_hf_cache(tmp_path / "hf", "acme/faces", {0: rows[:2], 1: rows[2:]})
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = tmp_path / "out"
    result = run_cli("--source", "acme/faces", "--num_images", 3, "--output_dir", out, env=env)
    assert result.returncode == 0, result.stderr
    assert "3 written" in result.stdout and f"acme/faces@{SHA[:12]}" in result.stdout
    assert listing(out) == ["00000.png", "00001.png", "00002.png"]
    assert all((out / f"{i:05d}.png").read_bytes() == rows[i] for i in range(3))
    record = json.loads((out / prepare.RECORD).read_text())
    assert record["source"] == {"kind": "hub", "id": "acme/faces"} and record["revision"] == SHA


def test_hub_offline_with_part_of_the_shards_says_so(tmp_path):
    # Shard 1 of 3 is missing from the cache: only shard 0 may be used, and 2 rows are not enough.
    # No refs/main, as after downloads by commit hash.
    fake_hf_cache(tmp_path / "hf", "acme/faces", {0: [image_bytes(0), image_bytes(1)], 2: [image_bytes(4)]},
                  refs_main=False)
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = run_cli("--source", "acme/faces", "--num_images", 3, "--output_dir", tmp_path / "out", env=env)
    assert result.returncode == 2
    assert "holds only 2 images" in result.stderr and "--source" in result.stderr
    assert listing(tmp_path / "out") == ["00000.png", "00001.png"]
    seeded = run_cli("--source", "acme/faces", "--seed", 0, "--output_dir", tmp_path / "seeded", env=env)
    assert seeded.returncode == 2 and "every shard" in seeded.stderr


def test_output_inside_the_source_folder_is_refused(tmp_path, capsys):
    src = tmp_path / "src"
    write_images(src, 2)
    assert run("--source", src, "--output_dir", src / "out") == 2
    assert "lies inside --source" in capsys.readouterr().err
    assert not (src / "out").exists()


def test_resolution_256_gives_the_extractor_the_same_pixels(tmp_path, tiny_model):
    """The processor resizes the shortest edge to 256 anyway: prepared at 256, its resize is a no-op."""
    from transformers import AutoImageProcessor

    from pyramid.decode import Preprocess, load_rgb

    src = tmp_path / "src"
    sizes = [(1024, 768), (700, 1001), (555, 999), (300, 300)]
    for i, size in enumerate(sizes):
        write_images(src, 1, size=size, seed=i, names=[f"{i:05d}.png"])
    out = tmp_path / "out"
    assert run("--source", src, "--resolution", 256, "--output_dir", out) == 0
    preprocess = Preprocess(AutoImageProcessor.from_pretrained(tiny_model, backend="pil"))
    for i in range(len(sizes)):
        original = preprocess(load_rgb(src / f"{i:05d}.png"))
        prepared = preprocess(load_rgb(out / f"{i:05d}.png"))
        assert min(Image.open(out / f"{i:05d}.png").size) == 256
        assert torch.equal(original, prepared), sizes[i]
