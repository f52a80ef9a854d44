"""pyramid/levels.py against hand-written references."""

import numpy as np
import torch

from pyramid.levels import (
    average_2x2,
    build_pyramid,
    level_side,
    pyramid_sizes,
    split_pyramids,
    strip_special_tokens,
    twin_rows,
)


def reference_average_2x2(patches, size):
    """2x2 block means with plain loops over a row-major grid: (B, S*S, D) -> (B, S/2*S/2, D)."""
    batch, _, dim = patches.shape
    half = size // 2
    out = torch.zeros(batch, half * half, dim, dtype=patches.dtype)
    for row in range(half):
        for col in range(half):
            block = [patches[:, (2 * row + dy) * size + (2 * col + dx)] for dy in (0, 1) for dx in (0, 1)]
            out[:, row * half + col] = sum(block) / 4
    return out


def test_strip_special_tokens_drops_cls_and_registers():
    hidden = torch.randn(2, 1 + 4 + 9, 5)
    assert torch.equal(strip_special_tokens(hidden), hidden[:, 1:])
    assert torch.equal(strip_special_tokens(hidden, num_register_tokens=4), hidden[:, 5:])
    assert strip_special_tokens(hidden, 4).shape == (2, 9, 5)


def test_pyramid_sizes():
    assert pyramid_sizes(16) == [16, 8, 4, 2, 1]
    assert pyramid_sizes(14) == [14, 7]
    assert pyramid_sizes(37) == [37]
    assert pyramid_sizes(24) == [24, 12, 6, 3]
    assert pyramid_sizes(32) == [32, 16, 8, 4, 2, 1]  # dinov2 at --resolution 448


def test_build_pyramid_of_an_odd_grid_stops_at_the_first_odd_side():
    """DINOv3 at 224: a 14x14 grid gives 14x14 and its 2x2 means, 7x7, and nothing coarser."""
    patches = torch.randn(2, 14 * 14, 3)
    levels = build_pyramid(patches, 14)
    assert list(levels) == ["14x14", "7x7"]
    assert torch.allclose(levels["7x7"], reference_average_2x2(patches, 14), atol=1e-6)


def test_average_2x2_matches_loop_reference():
    torch.manual_seed(0)
    for size in (16, 8, 2, 6):
        patches = torch.randn(3, size * size, 7)
        assert torch.allclose(average_2x2(patches, size), reference_average_2x2(patches, size), atol=1e-6)


def test_average_2x2_is_not_a_stride_or_column_mix():
    # Row-major: patch (row, col) = row * 4 + col; the top-left 2x2 block is indices 0, 1, 4, 5.
    patches = torch.arange(16, dtype=torch.float32).view(1, 16, 1)
    assert average_2x2(patches, 4).flatten().tolist() == [2.5, 4.5, 10.5, 12.5]


def test_build_pyramid_levels_are_successive_means():
    torch.manual_seed(1)
    patches = torch.randn(2, 256, 12)
    levels = build_pyramid(patches, 16)
    assert list(levels) == ["16x16", "8x8", "4x4", "2x2", "1x1"]
    assert torch.equal(levels["16x16"], patches)
    expected = patches
    for size, key in [(16, "8x8"), (8, "4x4"), (4, "2x2"), (2, "1x1")]:
        expected = reference_average_2x2(expected, size)
        assert torch.allclose(levels[key], expected, atol=1e-5), key
    assert torch.allclose(levels["1x1"][:, 0], patches.mean(dim=1), atol=1e-5)


def test_split_pyramids_owns_its_storage():
    levels = build_pyramid(torch.randn(4, 16, 3), 4)
    pyramids = split_pyramids(levels)
    assert len(pyramids) == 4
    for i, pyramid in enumerate(pyramids):
        for key, value in pyramid.items():
            assert value.shape == (1,) + levels[key].shape[1:]
            assert value.dtype == torch.float32 and value.is_contiguous()
            assert value.untyped_storage().nbytes() == value.numel() * 4  # not a view of the batch
            assert torch.equal(value[0], levels[key][i])


def test_level_side():
    assert level_side("16x16") == 16 and level_side("1x1") == 1
    assert [level_side(key) for key in ("16x8", "x", "0x0", "ax a", "16", 16, None)] == [None] * 7


def test_finite_images_flags_each_image_by_its_coarsest_level():
    from pyramid.levels import finite_images

    patches = torch.randn(5, 16, 3)
    patches[1, 7, 2] = float("nan")
    patches[2, 0, 0] = float("inf")
    patches[3, 4:6, 1] = float("inf")
    patches[3, 8, 1] = float("-inf")  # inf - inf in a sum: NaN, still non-finite
    patches[4, [0, 1, 4, 5], 0] = 3e38  # finite, but their 2x2 sum overflows: the 2x2 level holds inf
    levels = build_pyramid(patches, 4)
    assert levels["4x4"][4].isfinite().all() and not levels["2x2"][4].isfinite().all()
    assert finite_images(levels).tolist() == [True, False, False, False, False]
    reference = torch.stack([torch.cat([value[i].flatten() for value in levels.values()]).isfinite().all()
                             for i in range(5)])
    assert torch.equal(finite_images(levels), reference)
    assert finite_images(build_pyramid(patches[:, :9], 3)).tolist() == [True, False, False, False, True]


def test_stored_levels_round_once_to_nearest_even_and_flag_what_overflows():
    from pyramid.levels import finite_images, representable_images, stored_levels

    patches = torch.randn(3, 16, 8) * torch.logspace(-6, 4, 8)  # (B, G*G, D): tiny to large values
    patches[1, 5, 7] = 70000.0  # beyond fp16's 65504 (finite in fp32 and bf16)
    patches[2, 0, 0] = 65519.0  # rounds to 65504 in fp16: still finite
    levels = build_pyramid(patches, 4)
    bits = {key: value.numpy().view(np.uint32).astype(np.uint64) for key, value in levels.items()}
    for dtype in (torch.bfloat16, torch.float16):
        stored = stored_levels(levels, dtype)
        for key, value in stored.items():
            assert value.dtype == dtype and value.shape == levels[key].shape
            if dtype == torch.float16:  # numpy's float32 -> float16 rounds to nearest even
                with np.errstate(over="ignore"):  # 70000 becomes inf, as it should
                    expected = levels[key].numpy().astype(np.float16)
                assert np.array_equal(value.numpy(), expected, equal_nan=True), key
            else:  # bf16 by hand: the upper 16 bits of the float32, rounded to nearest, ties to even
                upper = (bits[key] + 0x7FFF + ((bits[key] >> 16) & 1)) >> 16
                assert np.array_equal(value.view(torch.int16).numpy().view(np.uint16), upper.astype(np.uint16))
        fits = representable_images(stored)
        assert finite_images(levels).tolist() == [True, True, True]
        assert fits.tolist() == ([True, False, True] if dtype == torch.float16 else [True, True, True])
    assert stored_levels(levels, torch.float32)["4x4"] is levels["4x4"]  # fp32 files: no copy


def test_twin_rows_keep_each_image_with_its_mirror():
    images, mirrors = torch.randn(5, 3, 2, 2), torch.randn(5, 3, 2, 2)
    batch = torch.cat([images, mirrors])  # (10, 3, 2, 2): the 5 images, then their 5 mirrors
    assert torch.equal(twin_rows(batch, 2, 5, 1, 3), torch.cat([images[1:4], mirrors[1:4]]))
    assert torch.equal(twin_rows(images, 1, 5, 3, 2), images[3:5])
