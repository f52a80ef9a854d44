"""pyramid/show.py: the PCA colours, the crop as the model saw it, and the picture the CLI writes."""

import argparse
import json
import pickle
import sys

import pytest
import torch
from PIL import Image

import warm
from conftest import REPO, needs_torchvision, write_images
from pyramid import show
from pyramid.synthetic import DINOV2_PREPROCESSOR, DINOV3_PREPROCESSOR

D = 48


def mean_2x2(tokens):
    """Reference pooling, written out: (s*s, D) -> (s/2 * s/2, D), each cell the mean of its 2x2 block."""
    side = int(tokens.shape[0] ** 0.5)
    grid = tokens.reshape(side, side, -1)
    half = side // 2
    out = torch.empty(half, half, tokens.shape[1])
    for row in range(half):
        for col in range(half):
            out[row, col] = grid[2 * row:2 * row + 2, 2 * col:2 * col + 2].reshape(4, -1).mean(0)
    return out.reshape(half * half, -1)


def make_pyramid(finest):
    """A contract-shaped pyramid dict built from a finest level (s*s, D), s a power of two."""
    pyramid, tokens = {}, finest
    while True:
        side = int(tokens.shape[0] ** 0.5)
        pyramid[f"{side}x{side}"] = tokens.unsqueeze(0).contiguous()  # (1, s*s, D)
        if side == 1:
            return pyramid
        tokens = mean_2x2(tokens)


def two_halves(seed=0, side=16, noise=0.1):
    """A finest level whose left half is one vector and right half another, plus noise. -> (s*s, D)"""
    generator = torch.Generator().manual_seed(seed)
    left, right = torch.randn(2, D, generator=generator)
    columns = torch.arange(side).repeat(side)  # column of each row-major patch
    tokens = torch.where((columns < side // 2)[:, None], left, right)
    return tokens + noise * torch.randn(side * side, D, generator=generator)


def save_pyramids(directory, count, seed=0):
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    paths = []
    for i in range(count):
        path = directory / f"{i:05d}.pt"
        torch.save(make_pyramid(torch.randn(256, D, generator=generator)), path)
        paths.append(path)
    return paths


def run_show(*argv):
    return show.main(show.get_args_parser().parse_args([str(a) for a in argv]))


def cell_box(row, column, cell):
    """Pixel box of a drawn cell (below its label strip), from the documented layout."""
    left = show.GAP + column * (cell + show.GAP)
    top = show.GAP + row * (show.LABEL_HEIGHT + cell + show.GAP) + show.LABEL_HEIGHT
    return left, top, left + cell, top + cell


def assert_solid(picture, colour, tolerance=3):
    for (low, high), expected in zip(picture.getextrema(), colour):
        assert expected - tolerance <= low <= high <= expected + tolerance, (picture.getextrema(), colour)


# ----------------------------------------------------------------------------- PCA colours


def test_two_halves_give_two_clearly_separated_colours():
    pyramid = make_pyramid(two_halves())
    pca = show.fit_pca(show.finest_tokens(pyramid))
    rgb = show.level_rgb(pyramid["16x16"][0], pca).float()  # (16, 16, 3)
    left, right = rgb[:, :8].reshape(-1, 3), rgb[:, 8:].reshape(-1, 3)
    # The first component is the left/right direction: red alone splits the halves with room to spare.
    low, high = sorted([left[:, 0], right[:, 0]], key=lambda red: red.mean().item())
    assert high.min() - low.max() > 200, (low.max(), high.min())
    # Components 2 and 3 fit the noise, yet every patch is nearer its own half's colour than the other's.
    for own, other in [(left, right), (right, left)]:
        assert ((own - own.mean(0)).norm(dim=1) < (own - other.mean(0)).norm(dim=1)).all()


def test_coarse_level_projects_to_the_2x2_mean_of_the_finer_projection():
    pyramid = make_pyramid(torch.randn(256, D))
    pca = show.fit_pca(show.finest_tokens(pyramid))
    fine = show.project(pyramid["16x16"][0], pca)
    assert torch.allclose(show.project(pyramid["8x8"][0], pca), mean_2x2(fine), atol=1e-5)
    assert torch.allclose(show.project(pyramid["1x1"][0], pca), fine.mean(0, keepdim=True), atol=1e-5)


def test_colours_agree_across_levels():
    # One basis and one scale for all levels: where no clipping intervenes, an 8x8 colour is the
    # mean of the four 16x16 colours it covers, up to rounding.
    pyramid = make_pyramid(torch.randn(256, D))
    pca = show.fit_pca(show.finest_tokens(pyramid))
    fine = show.level_rgb(pyramid["16x16"][0], pca).float().reshape(256, 3)
    coarse = show.level_rgb(pyramid["8x8"][0], pca).float().reshape(64, 3)
    in_range = mean_2x2(((show.project(pyramid["16x16"][0], pca) >= 0)
                         & (show.project(pyramid["16x16"][0], pca) <= 1)).float()) == 1
    assert in_range.sum() > 64  # most of the 64 x 3 values are compared
    assert ((coarse - mean_2x2(fine)).abs()[in_range] <= 1).all()


def test_each_component_has_its_largest_loading_positive():
    # eigh returns either sign; the documented rule pins it, so a file always gets the same colours.
    for seed in range(4):
        components = show.fit_pca(torch.randn(200, D, generator=torch.Generator().manual_seed(seed))).components
        largest = components.abs().argmax(0)
        assert (components[largest, torch.arange(3)] > 0).all()


def test_levels_come_from_the_keys_finest_first():
    pyramid = {"1x1": None, "12x12": None, "3x3": None, "6x6": None}
    assert show.levels_finest_first(pyramid) == ["12x12", "6x6", "3x3", "1x1"]


def test_spread_sample_covers_the_whole_list():
    assert show.spread_sample(list(range(10)), 4) == [0, 2, 5, 7]
    assert show.spread_sample([1, 2], 64) == [1, 2]


# ----------------------------------------------------------------------------- the model's crop


def test_model_view_is_the_centre_crop_after_resizing_the_shortest_edge(tmp_path):
    # 512x256: resized to 512x256 (shortest edge already 256), the centre 224 is columns 144..367.
    image = Image.new("RGB", (512, 256), (255, 0, 0))
    image.paste((0, 255, 0), (136, 0, 376, 256))  # green with 8 px to spare on each side of the crop
    image.save(tmp_path / "wide.png")
    view = show.model_view(tmp_path / "wide.png")
    assert view.size == (224, 224)
    assert view.getextrema() == ((0, 0), (255, 255), (0, 0))  # all green: no red edge, no squashing
    image.rotate(90, expand=True).resize((128, 256)).save(tmp_path / "tall.png")
    tall = show.model_view(tmp_path / "tall.png")
    assert tall.size == (224, 224) and tall.getextrema() == ((0, 0), (255, 255), (0, 0))


def test_model_view_matches_the_dinov2_processor(tmp_path):
    from transformers import AutoImageProcessor

    (tmp_path / "preprocessor_config.json").write_text(json.dumps(DINOV2_PREPROCESSOR))
    processor = AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
    path = write_images(tmp_path / "images", 1, size=(300, 200))[0]
    with Image.open(path) as image:
        expected = processor(images=image.convert("RGB"), do_normalize=False, return_tensors="pt")["pixel_values"][0]
    view = show.model_view(path)
    seen = torch.tensor(list(view.tobytes()), dtype=torch.float32).reshape(224, 224, 3).permute(2, 0, 1) / 255
    assert (seen - expected).abs().mean() < 1 / 255  # the same crop; only resampling rounding may differ


def picture_values(view, side):
    """The picture's 0..255 values as float (3, side, side)."""
    return torch.tensor(list(view.tobytes()), dtype=torch.float32).reshape(side, side, 3).permute(2, 0, 1)


def test_model_view_at_448_is_the_processor_called_with_512_and_448(tmp_path):
    from transformers import AutoImageProcessor

    (tmp_path / "preprocessor_config.json").write_text(json.dumps(DINOV2_PREPROCESSOR))
    processor = AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
    path = write_images(tmp_path / "images", 1, size=(300, 200))[0]
    with Image.open(path) as image:
        expected = processor(images=image.convert("RGB"), do_rescale=False, do_normalize=False, return_tensors="pt",
                             size={"shortest_edge": 512}, crop_size={"height": 448, "width": 448})["pixel_values"][0]
    assert torch.equal(picture_values(show.model_view(path, "dinov2", 448), 448), expected)


@needs_torchvision
def test_model_view_of_a_dinov3_tree_is_its_resize(tmp_path):
    from transformers import AutoImageProcessor

    (tmp_path / "preprocessor_config.json").write_text(json.dumps(DINOV3_PREPROCESSOR))
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    path = write_images(tmp_path / "images", 1, size=(300, 200))[0]
    with Image.open(path) as image:
        expected = processor(images=image.convert("RGB"), do_normalize=False, size={"height": 256, "width": 256},
                             return_tensors="pt")["pixel_values"][0]
    seen = picture_values(show.model_view(path, "dinov3", 256), 256) / 255
    assert (seen - expected).abs().max() < 2 / 255  # the whole image squeezed, not cropped; 8-bit rounding apart


def test_the_picture_takes_the_family_and_resolution_from_the_tree(tmp_path):
    (tmp_path / "a").mkdir()
    assert show.tree_view_settings(tmp_path / "a") == ("dinov2", 224)  # no manifest: the defaults
    (tmp_path / "manifest.json").write_text(json.dumps({"model_family": "dinov3", "resolution": 256}))
    assert show.tree_view_settings(tmp_path / "a" / "x.pt") == ("dinov3", 256)
    (tmp_path / "manifest.json").write_text(json.dumps({"crop_size": 224}))  # from before DINOv3
    assert show.tree_view_settings(tmp_path) == ("dinov2", 224)


# ----------------------------------------------------------------------------- the CLI


def test_cli_writes_one_row_next_to_the_input(tmp_path):
    path = tmp_path / "00001.pt"
    torch.save(make_pyramid(two_halves()), path)
    cell = 32
    assert run_show(path, "--cell", cell) == 0
    picture = Image.open(tmp_path / "00001.png").convert("RGB")
    assert picture.size == (show.GAP + 5 * (cell + show.GAP), show.GAP + show.LABEL_HEIGHT + cell + show.GAP)
    finest = picture.crop(cell_box(0, 0, cell))
    assert len(finest.getcolors(cell * cell)) >= 2  # not uniform: the two halves show
    left, right = finest.getpixel((2, cell // 2)), finest.getpixel((cell - 3, cell // 2))
    assert sum(abs(a - b) for a, b in zip(left, right)) > 200


def test_cli_grid_with_images_and_shared_pca(tmp_path):
    save_pyramids(tmp_path / "pyramids" / "sub", 3)
    images = tmp_path / "images" / "sub"
    images.mkdir(parents=True)
    for i, colour in enumerate([(255, 0, 0), (0, 0, 255), (0, 255, 0)]):
        Image.new("RGB", (300, 260), colour).save(images / f"{i:05d}{['.png', '.JPG', '.webp'][i]}")
    cell, output = 32, tmp_path / "grid.png"
    code = run_show(tmp_path / "pyramids", "--image", tmp_path / "images", "--grid", 2,
                    "--pca_from", tmp_path / "pyramids", "--cell", cell, "-o", output)
    assert code == 0
    picture = Image.open(output).convert("RGB")
    columns, rows = 1 + 5, 2
    assert picture.size == (show.GAP + columns * (cell + show.GAP),
                            show.GAP + rows * (show.LABEL_HEIGHT + cell + show.GAP))
    assert_solid(picture.crop(cell_box(0, 0, cell)), (255, 0, 0))  # row 0: its own image, red
    assert_solid(picture.crop(cell_box(1, 0, cell)), (0, 0, 255))  # row 1: blue (a JPEG, so nearly)
    for row in range(rows):
        assert len(picture.crop(cell_box(row, 1, cell)).getcolors(cell * cell)) > 1


def test_cli_levels_follow_the_file(tmp_path):
    path = tmp_path / "odd.pt"
    torch.save({"12x12": torch.randn(1, 144, D), "6x6": torch.randn(1, 36, D), "3x3": torch.randn(1, 9, D)}, path)
    assert run_show(path, "--cell", 24, "-o", tmp_path / "odd.png") == 0
    assert Image.open(tmp_path / "odd.png").width == show.GAP + 3 * (24 + show.GAP)


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ([torch.zeros(1)], "not a pyramid"),
    ({"16x16": torch.zeros(1, 255, D)}, "not a pyramid"),
    ({"16x8": torch.zeros(1, 128, D)}, "not a pyramid"),
    (b"not torch", "not a readable torch file"),
])
def test_cli_refuses_a_bad_input_in_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "bad.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    assert run_show(path, "-o", tmp_path / "out.png") == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out.png").exists()


def test_cli_refuses_a_missing_image_before_drawing(tmp_path, capsys):
    save_pyramids(tmp_path / "pyramids", 1)
    (tmp_path / "images").mkdir()
    assert run_show(tmp_path / "pyramids", "--image", tmp_path / "images", "-o", tmp_path / "o.png") == 2
    assert "no image for 00000.pt" in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()


def test_a_pickle_that_is_not_a_pyramid_is_refused_in_one_short_line(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"args": argparse.Namespace(lr=0.1)}, path)  # a training checkpoint, say
    (tmp_path / "plain.pt").write_bytes(pickle.dumps({"a": 1}, protocol=4))  # torch warns about protocol 4
    for bad, message in [(path, "not a pyramid (it holds Python objects other than tensors; Unsupported global: "
                                "GLOBAL argparse.Namespace)"),
                         (tmp_path / "plain.pt", "not a readable torch file (Unsupported operand 149)")]:
        result = warm.run([sys.executable, "-m", "pyramid.show", str(bad)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
        assert result.returncode == 2
        assert result.stderr.splitlines() == [f"error: {bad}: {message}"], result.stderr


def test_python_dash_m_runs(tmp_path):
    path = save_pyramids(tmp_path, 1)[0]
    result = warm.run([sys.executable, "-m", "pyramid.show", str(path), "--cell", "16"],
                      cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert path.with_suffix(".png").is_file() and "wrote" in result.stdout


# ----------------------------------------------------------------------------- files made with --flip


def with_twin(pyramid, twin):
    """A file as the extractor's --flip writes it: the levels, then their flip/ twins."""
    return {**pyramid, **{f"flip/{key}": value for key, value in twin.items()}}


def mirrored(tokens, side=16):
    """The patch grid mirrored left-right: (s*s, D) -> (s*s, D)."""
    return tokens.reshape(side, side, -1).flip(1).reshape(side * side, -1)


def test_separate_flip_levels_parts_a_loaded_file_by_its_keys():
    """A file's own levels from its flip/ twins, by key (levels.split_twins instead splits a doubled batch by rows)."""
    pyramid = with_twin({"2x2": torch.zeros(1, 4, 3), "1x1": torch.ones(1, 1, 3)}, {"2x2": torch.full((1, 4, 3), 2.0)})
    levels, twins = show.separate_flip_levels(pyramid)
    assert list(levels) == ["2x2", "1x1"] and list(twins) == ["flip/2x2"]
    assert levels["1x1"] is pyramid["1x1"] and twins["flip/2x2"] is pyramid["flip/2x2"]


def test_a_file_made_with_flip_is_drawn_and_its_twin_on_request(tmp_path):
    tokens = two_halves()
    path = tmp_path / "00001.pt"
    torch.save(with_twin(make_pyramid(tokens), make_pyramid(mirrored(tokens))), path)
    cell = 32
    assert run_show(path, "--cell", cell, "-o", tmp_path / "plain.png") == 0
    plain = Image.open(tmp_path / "plain.png").convert("RGB")
    assert plain.size == (show.GAP + 5 * (cell + show.GAP), show.GAP + show.LABEL_HEIGHT + cell + show.GAP)

    assert run_show(path, "--cell", cell, "--flip", "-o", tmp_path / "flip.png") == 0
    picture = Image.open(tmp_path / "flip.png").convert("RGB")
    assert picture.size == (plain.width, show.GAP + 2 * (show.LABEL_HEIGHT + cell + show.GAP))
    image, twin = picture.crop(cell_box(0, 0, cell)), picture.crop(cell_box(1, 0, cell))
    # The twin row draws the mirrored halves, in the same colours: its left is the image's right.
    left, right = image.getpixel((2, cell // 2)), image.getpixel((cell - 3, cell // 2))
    assert sum(abs(a - b) for a, b in zip(left, right)) > 200
    assert sum(abs(a - b) for a, b in zip(twin.getpixel((2, cell // 2)), right)) < 30
    assert sum(abs(a - b) for a, b in zip(twin.getpixel((cell - 3, cell // 2)), left)) < 30


def test_flip_rows_in_directory_mode_with_mirrored_images(tmp_path):
    tokens = two_halves()
    (tmp_path / "pyramids").mkdir()
    for i in range(2):
        torch.save(with_twin(make_pyramid(tokens), make_pyramid(mirrored(tokens))), tmp_path / "pyramids" / f"{i}.pt")
    (tmp_path / "images").mkdir()
    image = Image.new("RGB", (256, 256), (255, 0, 0))
    image.paste((0, 0, 255), (128, 0, 256, 256))  # red left half, blue right half
    for i in range(2):
        image.save(tmp_path / "images" / f"{i}.png")
    cell, output = 32, tmp_path / "grid.png"
    assert run_show(tmp_path / "pyramids", "--image", tmp_path / "images", "--flip", "--cell", cell,
                    "-o", output) == 0
    picture = Image.open(output).convert("RGB")
    assert picture.height == show.GAP + 4 * (show.LABEL_HEIGHT + cell + show.GAP)  # two files, two rows each
    for row in (0, 2):
        drawn = picture.crop(cell_box(row, 0, cell))
        assert_solid(drawn.crop((0, 0, 8, cell)), (255, 0, 0), tolerance=8)
        twin = picture.crop(cell_box(row + 1, 0, cell))  # the mirrored image: blue on the left
        assert_solid(twin.crop((0, 0, 8, cell)), (0, 0, 255), tolerance=8)


def test_flip_on_a_file_without_twins_is_refused_in_one_line(tmp_path, capsys):
    path = save_pyramids(tmp_path, 1)[0]
    assert run_show(path, "--flip", "-o", tmp_path / "o.png") == 2
    err = capsys.readouterr().err
    assert "has no flip/ levels" in err and err.count("\n") == 1, err
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_size_file_is_drawn_as_its_fp32_twin_is(tmp_path, dtype):
    pyramid = make_pyramid(two_halves())
    torch.save(pyramid, tmp_path / "fp32.pt")
    torch.save({key: value.to(dtype) for key, value in pyramid.items()}, tmp_path / "half.pt")
    assert run_show(tmp_path / "fp32.pt", "--cell", 16) == 0 and run_show(tmp_path / "half.pt", "--cell", 16) == 0
    full = Image.open(tmp_path / "fp32.png").convert("RGB")
    half = Image.open(tmp_path / "half.png").convert("RGB")
    assert full.size == half.size
    differences = [abs(a - b) for a, b in zip(full.tobytes(), half.tobytes())]  # every channel of every pixel
    # The same picture to the store's rounding: the colour scale is fitted to percentiles of the rounded values,
    # so a few cells of the noise components move a little (bf16 keeps 8 bits), the picture as a whole not.
    assert sum(differences) / len(differences) < 1.0 and max(differences) <= 24, (
        sum(differences) / len(differences), max(differences))
