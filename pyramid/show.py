"""PCA->RGB pictures of a pyramid: the source image beside every level, one row per file.

    python -m pyramid.show data/feature_pyramids/00001.pt --image data/raw_images/00001.png
    python -m pyramid.show data/feature_pyramids --image data/raw_images --grid 8 -o grid.png
    python -m pyramid.show data/feature_pyramids/00001.pt --image data/raw_images/00001.png --flip

The first three principal components of the patch features, mapped to RGB, are the usual picture
for DINOv2: parts of a face come out as coherent colours. The basis and the colour scale are fitted
once, on the finest level (of the file, of the rows drawn, or of `--pca_from`), and applied to every
level, so a colour means the same thing in every cell of the picture. Projection is linear, so a
coarse cell's colour (before clipping) is the mean of the four finer cells it was pooled from.

Files made with --flip also hold the mirrored image's pyramid (flip/{s}x{s}); --flip draws it too, in a
row of its own under each file's row, beside the mirrored image, in the same colours.
"""

import os
import pickle
import sys
import warnings
from pathlib import Path
from typing import NamedTuple

from PIL import Image, ImageDraw, ImageFont, ImageOps

from pyramid.cli import LazyModule, argument_parser, command_name, refusals_exit_2
from pyramid.exits import DamagedFile, UsageError
from pyramid.families import DEFAULT_FAMILY
from pyramid.levels import level_side
from pyramid.paths import IMAGE_SUFFIXES
from pyramid.tree import FLIP_PREFIX, MANIFEST_NAME, manifest_resolution, model_family, read_manifest, scan_outputs
from pyramid.validate import open_regular

torch = LazyModule("torch")  # loaded with the first pyramid, so --help and bad arguments answer at once

# The dinov2 image processor's defaults (every DINOv2 on the hub ships them): resize the shortest
# edge to 256 bicubic, centre crop 224; at --resolution R the shortest edge is round(R x 256 / 224). The image
# column shows exactly that crop (the tree's manifest says the family and resolution; without one, these).
RESIZE_SHORTEST_EDGE = 256
CROP_SIZE = 224

# Layout of the picture: a label strip above every cell, a gap around every cell.
LABEL_HEIGHT = 14
GAP = 4
BACKGROUND = (255, 255, 255)
TEXT = (0, 0, 0)


class PcaColours(NamedTuple):
    """A 3-component PCA basis and the fixed scale that maps its coordinates to [0, 1]."""
    mean: "torch.Tensor"        # (D,)
    components: "torch.Tensor"  # (D, 3)
    low: "torch.Tensor"         # (3,) 1st percentile of the fitting data's coordinates
    high: "torch.Tensor"        # (3,) 99th percentile


# ----------------------------------------------------------------------------- pyramids


def first_line(error):
    """An exception as one line: torch's unpickling errors run to several paragraphs."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def key_side(key):
    """The grid side of a level key or of its mirrored twin: '8x8' -> 8, 'flip/8x8' -> 8; None otherwise."""
    return level_side(key.removeprefix(FLIP_PREFIX) if isinstance(key, str) else key)


def levels_finest_first(pyramid):
    """The pyramid's level keys, finest first: {'1x1', '4x4', '2x2'} -> ['4x4', '2x2', '1x1']."""
    return sorted(pyramid, key=key_side, reverse=True)


def separate_flip_levels(pyramid):
    """(levels, mirrored twins) of a loaded pyramid: {'8x8', 'flip/8x8', ...} -> ({'8x8', ...}, {'flip/8x8', ...})."""
    twins = {key: value for key, value in pyramid.items() if key.startswith(FLIP_PREFIX)}
    return {key: value for key, value in pyramid.items() if key not in twins}, twins


def load_pyramid(path):
    """Load a pyramid file and check it is one: a dict of 'sxs' (and, from --flip, 'flip/sxs') -> float tensor
    [1, s*s, D], one D."""
    try:
        os.close(open_regular(path))  # a FIFO would block torch.load
    except DamagedFile as error:
        raise UsageError(str(error)) from None
    except OSError as error:
        raise UsageError(f"{path}: cannot be opened ({error.strerror or error})") from None
    try:
        with warnings.catch_warnings():  # torch warns about a pickle's protocol before it refuses the file
            warnings.simplefilter("ignore")
            pyramid = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's message is a paragraph on weights_only and trusted sources; its last part says what it met
        detail = str(error).partition("WeightsUnpickler error:")[2].strip()
        detail = detail.splitlines()[0].split(" was not an allowed global")[0] if detail else first_line(error)
        if "Unsupported global" in detail:
            raise UsageError(f"{path}: not a pyramid (it holds Python objects other than tensors; {detail})") from None
        raise UsageError(f"{path}: not a readable torch file ({detail})") from None
    except Exception as error:
        raise UsageError(f"{path}: not a readable torch file ({first_line(error)})") from None
    if not isinstance(pyramid, dict) or not pyramid:
        raise UsageError(f"{path}: not a pyramid (expected a dict of '16x16'-style keys to tensors, "
                         f"got {type(pyramid).__name__})")
    hidden_sizes = set()
    for key, value in pyramid.items():
        side = key_side(key)
        if side is None:
            raise UsageError(f"{path}: not a pyramid (key {key!r} is not of the form 'sxs' or 'flip/sxs')")
        if not (isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() == 3
                and value.shape[0] == 1 and value.shape[1] == side * side):
            shape = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise UsageError(f"{path}: not a pyramid ({key} holds {shape}, expected a float [1, {side * side}, D])")
        hidden_sizes.add(value.shape[2])
    if len(hidden_sizes) > 1:
        raise UsageError(f"{path}: not a pyramid (levels have different hidden sizes {sorted(hidden_sizes)})")
    if not separate_flip_levels(pyramid)[0]:
        raise UsageError(f"{path}: not a pyramid (only 'flip/' levels, no levels of the image itself)")
    return pyramid


def finest_tokens(pyramid):
    """The finest level's patch features. -> (s*s, D) float32."""
    return pyramid[levels_finest_first(pyramid)[0]][0].float()


def find_pyramids(root):
    """Every finished .pt file under a directory (no temporaries), sorted by relative path."""
    finished, _ = scan_outputs(root)
    return [root / relative for relative in sorted(finished)]


def spread_sample(paths, count):
    """`count` paths evenly spread over a sorted list (all of them if there are fewer): deterministic
    and representative of the whole tree, not only of its first folder."""
    if len(paths) <= count:
        return list(paths)
    return [paths[i * len(paths) // count] for i in range(count)]


# ----------------------------------------------------------------------------- PCA -> RGB


def fit_pca(features):
    """Fit a 3-component PCA and its colour scale to feature rows (N, D).

    Components are the top eigenvectors of the covariance (the right singular vectors of the
    centred data), each signed so its largest loading is positive, so the same data always gives
    the same colours. The scale is the per-component 1st/99th percentile of the data's own
    coordinates, so a few outlier patches do not wash out the rest. Fewer than 3 components
    (D < 3) leave the missing channels at zero.
    """
    features = features.double()                                   # (N, D)
    mean = features.mean(0)                                        # (D,)
    centred = features - mean
    covariance = centred.T @ centred / max(len(features) - 1, 1)  # (D, D)
    _, eigenvectors = torch.linalg.eigh(covariance)                # ascending eigenvalues
    top = eigenvectors.flip(1)[:, :3]                              # (D, k), k = min(3, D)
    largest = top.abs().argmax(0)
    top = top * torch.sign(top[largest, torch.arange(top.shape[1])])
    components = torch.zeros(features.shape[1], 3, dtype=torch.float64)
    components[:, :top.shape[1]] = top                             # (D, 3)
    coordinates = centred @ components                             # (N, 3)
    low = torch.quantile(coordinates, 0.01, dim=0)
    high = torch.quantile(coordinates, 0.99, dim=0)
    return PcaColours(mean.float(), components.float(), low.float(), high.float())


def project(tokens, pca):
    """PCA coordinates of patch features on the fitted scale, not clipped: (s*s, D) -> (s*s, 3).

    Linear in `tokens`, so the projection of a 2x2 mean is the 2x2 mean of the projections.
    """
    span = (pca.high - pca.low).clamp_min(1e-12)  # a constant component would divide by zero
    return ((tokens.float() - pca.mean) @ pca.components - pca.low) / span


def level_rgb(tokens, pca):
    """A level's colour map: (s*s, D) -> (s, s, 3) uint8, row-major like the patches."""
    side = int(round(tokens.shape[0] ** 0.5))
    rgb = (project(tokens, pca).clamp(0, 1) * 255).round().to(torch.uint8)  # (s*s, 3)
    return rgb.reshape(side, side, 3)


def level_picture(tokens, pca, cell):
    """A level drawn as a `cell` x `cell` picture, each patch a flat square (nearest neighbour)."""
    rgb = level_rgb(tokens, pca)
    side = rgb.shape[0]
    # bytes() keeps this free of numpy: Pillow and torch only.
    picture = Image.frombytes("RGB", (side, side), bytes(rgb.flatten().tolist()))
    return picture.resize((cell, cell), Image.Resampling.NEAREST)


# ----------------------------------------------------------------------------- the image


def model_view(path, family=DEFAULT_FAMILY, resolution=CROP_SIZE, mirrored=False):
    """The image as the model saw it: EXIF orientation applied, RGB, (`mirrored`: flipped left-right, as
    --flip does before the processor,) then DINOv2's shortest edge resized to round(R x 256 / 224) (bicubic) and
    centre crop R x R, the same arithmetic as the dinov2 processor; or DINOv3's resize to R x R (bilinear,
    antialiased; Pillow's on 8 bits, so within a level of the processor's floats)."""
    from pyramid.decode import load_rgb, resize_and_crop  # loads torch: imported for the work, not for --help

    try:
        image = load_rgb(path)  # the extractor's own input rules
    except Exception as error:
        raise UsageError(f"{path}: not a readable image ({first_line(error)})") from None
    image = ImageOps.mirror(image) if mirrored else image
    if family == "dinov3":
        return image.resize((resolution, resolution), Image.Resampling.BILINEAR)
    return resize_and_crop(image, round(resolution * RESIZE_SHORTEST_EDGE / CROP_SIZE), resolution, resolution)


def tree_view_settings(pyramid_path):
    """(model family, resolution) of the tree holding `pyramid_path` (a file or a directory): from the manifest of
    the nearest folder that has one, at or above it; DINOv2 at 224 where none does."""
    start = Path(pyramid_path).resolve()
    for folder in ([start] if start.is_dir() else []) + list(start.parents):
        if (folder / MANIFEST_NAME).is_file():
            try:
                manifest = read_manifest(folder)
            except (OSError, ValueError):  # a damaged manifest: the picture still shows, at the defaults
                break
            if isinstance(manifest, dict) and isinstance(manifest_resolution(manifest), int):
                return model_family(manifest), manifest_resolution(manifest)
            break
    return DEFAULT_FAMILY, CROP_SIZE


def matching_image(image_root, relative):
    """The image under `image_root` with the same relative name as a pyramid file (any image
    suffix, any letter case): 'a/b.pt' -> image_root/a/b.png. None if there is none."""
    folder = image_root / relative.parent
    if not folder.is_dir():
        return None
    matches = sorted(p for p in folder.iterdir()
                     if p.stem == relative.stem and p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    return matches[0] if matches else None


# ----------------------------------------------------------------------------- the picture


def fit_label(draw, text, width, font):
    """`text`, shortened from the left with '...' until it fits `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength("..." + text, font=font) > width:
        text = text[1:]
    return "..." + text


def draw_rows(rows, pca, cell):
    """Draw rows of (name, pyramid, image or None) into one picture.

    Each row: the image (if any rows have one), then every level finest first, each `cell` pixels
    square under a label strip. The image cell is labelled with the row's name, or, without an
    image, the first level is labelled 'name: key'.
    """
    with_images = any(image is not None for _, _, image in rows)
    columns = max(len(pyramid) for _, pyramid, _ in rows) + with_images
    width = GAP + columns * (cell + GAP)
    height = GAP + len(rows) * (LABEL_HEIGHT + cell + GAP)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for row, (name, pyramid, image) in enumerate(rows):
        top = GAP + row * (LABEL_HEIGHT + cell + GAP)
        cells = []
        if with_images:
            cells.append((name, image.resize((cell, cell), Image.Resampling.LANCZOS) if image else None))
        for i, key in enumerate(levels_finest_first(pyramid)):
            label = f"{name}: {key}" if i == 0 and not with_images else key
            cells.append((label, level_picture(pyramid[key][0], pca, cell)))
        for column, (label, picture) in enumerate(cells):
            left = GAP + column * (cell + GAP)
            draw.text((left, top), fit_label(draw, label, cell, font), fill=TEXT, font=font)
            if picture is not None:
                canvas.paste(picture, (left, top + LABEL_HEIGHT))
    return canvas


# ----------------------------------------------------------------------------- command line


def get_args_parser():
    parser = argument_parser(command_name("pyramid.show"), __doc__)
    parser.add_argument("pyramid", type=Path,
                        help="a .pt pyramid file, or a directory of them (draws --grid files, one row each)")
    parser.add_argument("--image", type=Path,
                        help="the source image; for a directory, the image directory: each row's image is the "
                             "file with the same relative name and any image suffix")
    parser.add_argument("-o", "--output", type=Path,
                        help="the PNG to write (default: the input with the suffix .png, beside it)")
    parser.add_argument("--grid", type=int,
                        help="with a directory: draw its first N files in sorted order, one row each (default: 8)")
    parser.add_argument("--pca_from", type=Path,
                        help="fit the PCA on the finest level of files from this directory (or file), so "
                             "pictures of different runs use the same colours (default: the files drawn)")
    parser.add_argument("--pca_files", type=int, default=64,
                        help="how many files of --pca_from to fit on, evenly spread over the sorted tree")
    parser.add_argument("--cell", type=int, default=CROP_SIZE, help="side of each drawn cell in pixels")
    parser.add_argument("--flip", action="store_true",
                        help="also draw the mirrored image's pyramid (the flip/ levels of a file made with the "
                             "extractor's --flip), in a row under each file's row, beside the mirrored image")
    return parser


def rows_to_draw(args):
    """Validate the arguments and return [(name, pyramid path, image path or None)]."""
    if not args.pyramid.exists():
        raise UsageError(f"{args.pyramid}: no such file or directory")
    if args.image is not None and not args.image.exists():
        raise UsageError(f"--image {args.image}: no such file or directory")
    if args.image is not None and not (args.image.is_dir() or args.image.is_file()):  # a FIFO would block
        raise UsageError(f"--image {args.image}: not a regular file or a directory")
    if args.pyramid.is_dir():
        paths = find_pyramids(args.pyramid)
        if not paths:
            raise UsageError(f"{args.pyramid}: no .pt files in this directory")
        if args.image is not None and not args.image.is_dir():
            raise UsageError("--image must be a directory of images when the pyramid argument is a directory")
        chosen = paths[:8 if args.grid is None else args.grid]
        rows = []
        for path in chosen:
            relative = path.relative_to(args.pyramid)
            image = None
            if args.image is not None:
                image = matching_image(args.image, relative)
                if image is None:
                    raise UsageError(f"no image for {relative} under {args.image} (same relative name, "
                                     f"any of {', '.join(sorted(IMAGE_SUFFIXES))})")
            rows.append((relative.as_posix(), path, image))
        return rows
    if args.grid is not None:
        raise UsageError("--grid draws several files: give a directory of pyramids, not one file")
    image = args.image
    if image is not None and image.is_dir():
        image = matching_image(image, Path(args.pyramid.name))
        if image is None:
            raise UsageError(f"no image named {args.pyramid.stem}.* under {args.image}")
    return [(args.pyramid.name, args.pyramid, image)]


def pca_fitting_paths(args, drawn):
    """The files whose finest levels the PCA is fitted on."""
    if args.pca_from is None:
        return drawn
    if not args.pca_from.exists():
        raise UsageError(f"--pca_from {args.pca_from}: no such file or directory")
    if args.pca_from.is_file():
        return [args.pca_from]
    paths = find_pyramids(args.pca_from)
    if not paths:
        raise UsageError(f"--pca_from {args.pca_from}: no .pt files in this directory")
    return spread_sample(paths, args.pca_files)


def output_path(args):
    """-o, or the input with a .png suffix."""
    output = args.output or args.pyramid.resolve().with_suffix(".png")
    if output.suffix.lower() != ".png":
        raise UsageError(f"-o {output}: the picture is a PNG; give a file name ending in .png")
    return output


@refusals_exit_2
def main(args):
    if args.grid is not None and args.grid < 1:
        raise UsageError(f"--grid {args.grid}: give a positive number of rows")
    if args.pca_files < 1 or args.cell < 1:
        raise UsageError("--pca_files and --cell must be positive")
    output = output_path(args)
    planned = rows_to_draw(args)
    pyramids = {path: separate_flip_levels(load_pyramid(path)) for _, path, _ in planned}  # path -> (levels, twins)
    if args.flip:
        unmirrored = [path for path, (_, twins) in pyramids.items() if not twins]
        if unmirrored:
            raise UsageError(f"--flip: {unmirrored[0]} has no flip/ levels (the extractor ran without --flip)")
    fitting = pca_fitting_paths(args, [path for _, path, _ in planned])
    features = [finest_tokens(pyramids[p][0] if p in pyramids else separate_flip_levels(load_pyramid(p))[0])
                for p in fitting]
    if args.flip and args.pca_from is None:  # the twins drawn are part of the data the colours fit
        features += [finest_tokens(twins) for _, twins in pyramids.values()]
    hidden_sizes = {f.shape[1] for f in features} | {finest_tokens(p).shape[1] for p, _ in pyramids.values()}
    if len(hidden_sizes) > 1:
        raise UsageError(f"the files have different hidden sizes {sorted(hidden_sizes)}: "
                         f"they come from different models and cannot share one PCA")
    pca = fit_pca(torch.cat(features))  # (N, D) from every fitting file's finest level
    family, resolution = tree_view_settings(args.pyramid)
    rows = []
    for name, path, image in planned:
        levels, twins = pyramids[path]
        rows.append((name, levels, model_view(image, family, resolution) if image else None))
        if args.flip:
            rows.append((f"{name} mirrored", twins,
                         model_view(image, family, resolution, mirrored=True) if image else None))
    picture = draw_rows(rows, pca, args.cell)
    output.parent.mkdir(parents=True, exist_ok=True)
    picture.save(output, format="PNG", optimize=True)
    print(f"wrote {output} ({picture.width}x{picture.height}, {len(rows)} row(s), "
          f"PCA fitted on {len(fitting)} file(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
