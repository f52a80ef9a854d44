"""The pyramid levels: strip the CLS and register tokens, then 2x2 means of the patch grid down to 1x1."""

from pyramid.tree import FLIP_PREFIX, flip_twin, level_name_side


def strip_special_tokens(hidden_states, num_register_tokens=0):
    """Return the patch tokens of a DINOv2 `last_hidden_state`.

    DINOv2 puts the CLS token first and, with registers, `num_register_tokens` register tokens
    after it; the patch tokens follow in row-major order.
    (B, 1 + R + G*G, D) -> (B, G*G, D)
    """
    return hidden_states[:, 1 + num_register_tokens:, :]


def pyramid_sizes(grid_size):
    """Side lengths of the pyramid levels: G, G/2, G/4, ... while the side is even, then that side.

    16 -> [16, 8, 4, 2, 1]; 14 -> [14, 7]; 37 -> [37].
    """
    sizes = [grid_size]
    while sizes[-1] % 2 == 0:
        sizes.append(sizes[-1] // 2)
    return sizes


def level_key(size):
    """The file key of a level: 16 -> '16x16'."""
    return f"{size}x{size}"


def level_side(key):
    """The grid side of a level key: '16x16' -> 16; None for anything that is not '{s}x{s}', s >= 1 in ASCII
    digits without leading zeros ('08x08', 'flip/8x8' and '../8x8' are not level keys)."""
    if isinstance(key, str) and key.startswith(FLIP_PREFIX):
        return None
    return level_name_side(key)


def average_2x2(patches, size):
    """Mean of each 2x2 block of a row-major grid of patch vectors.

    (B, S*S, D) -> (B, S/2*S/2, D), row-major again.
    """
    batch, _, dim = patches.shape
    half = size // 2
    grid = patches.reshape(batch, half, 2, half, 2, dim)  # (B, row, dy, col, dx, D)
    return grid.mean(dim=(2, 4)).reshape(batch, half * half, dim)


def build_pyramid(patches, grid_size):
    """All levels of the pyramid for a batch of patch grids, finest first.

    patches: (B, G*G, D) float. Returns {"GxG": (B, G*G, D), "G/2xG/2": ..., ...}.
    """
    levels = {}
    level = patches
    sizes = pyramid_sizes(grid_size)
    for size in sizes:
        levels[level_key(size)] = level
        if size != sizes[-1]:
            level = average_2x2(level, size)
    return levels


def finite_images(levels):
    """(B,) bool on the levels' device: True where every value of the image's pyramid is finite.

    Only the coarsest level is read. Each level is made of sums of the one above it, and a sum that
    takes in a NaN or an infinity is never finite again, so a non-finite value anywhere in an image's
    pyramid, or an overflow while pooling, reaches its coarsest level: one small reduction, no host sync.
    """
    coarsest = levels[next(reversed(levels))]  # (B, s*s, D)
    return coarsest.isfinite().flatten(1).all(dim=1)


def stored_levels(levels, dtype):
    """The fp32 levels rounded once into the files' dtype (a torch dtype), by torch's round to nearest even;
    the levels themselves for float32. An fp32 value beyond the dtype's range (|x| > 65504 for fp16) becomes inf:
    `representable_images` tells those images apart."""
    return {key: value if value.dtype == dtype else value.to(dtype) for key, value in levels.items()}


def representable_images(stored):
    """(B,) bool on the levels' device: True where rounding the image's pyramid into the stored dtype left every
    value finite, given `stored` (the rounded levels) of an image whose fp32 levels are finite (`finite_images`).

    Only the finest level is read: a coarser value is a mean of finer ones, so its magnitude is at most theirs,
    and rounding is monotonic, so where the finest level fits the range every coarser one does too.
    """
    finest = stored[next(iter(stored))]  # (B, G*G, D)
    return finest.isfinite().flatten(1).all(dim=1)


def split_twins(levels):
    """A batch of B images followed by their B mirrors -> the levels of the B images and their flip/ twins.

    {"16x16": (2B, 256, D), ...} -> {"16x16": (B, 256, D), ..., "flip/16x16": (B, 256, D), ...}
    """
    half = next(iter(levels.values())).shape[0] // 2
    twins = {key: value[:half] for key, value in levels.items()}
    twins.update({flip_twin(key): value[half:] for key, value in levels.items()})
    return twins


def twin_rows(pixels, parts, count, start, rows):
    """Rows start..start+rows of a batch of `count` images, with their mirrors where `parts` is 2: the pixels
    hold the images, then their mirrors in the same order."""
    if parts == 1:
        return pixels[start:start + rows]
    return pixels.view(parts, count, *pixels.shape[1:])[:, start:start + rows].reshape(-1, *pixels.shape[1:])


def split_pyramids(levels):
    """Split a batched pyramid into one dict per image, each value (1, S*S, D) in the levels' dtype, contiguous.

    Each tensor is one copy of its rows, so a saved file holds only its own storage: torch.save of
    a view would store the whole batch's storage (a 50 MB file for a 64-image base batch).
    """
    batch = next(iter(levels.values())).shape[0]
    return [{key: value[i:i + 1].clone().contiguous() for key, value in levels.items()}
            for i in range(batch)]
