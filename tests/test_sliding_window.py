"""Sliding window: window rule, Gaussian map, exact stitching, padding, mirror TTA, fold averaging, 2D."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from medseg3d.inference.sliding_window import (
    gaussian_importance_map,
    mirror_variants,
    sliding_window_predict,
    window_starts,
)

torch.set_num_threads(1)


class Pointwise(nn.Module):
    """Logits `(B, 3, ...)` a known voxel-wise function of the input: stitching must reproduce it exactly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([2 * x[:, :1], -x[:, :1], torch.sin(3 * x[:, :1])], dim=1)


def expected(data: torch.Tensor) -> torch.Tensor:
    return torch.softmax(Pointwise()(data[None])[0], dim=0)


def small_conv(dims: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    conv = nn.Conv3d if dims == 3 else nn.Conv2d
    return nn.Sequential(conv(1, 4, 3, padding=1), nn.LeakyReLU(), conv(4, 3, 3, padding=1)).eval()


@pytest.mark.parametrize("size,patch,step", [(100, 40, 0.5), (41, 40, 0.5), (40, 40, 0.5), (57, 16, 0.33), (7, 3, 1.0)])
def test_window_starts_cover_flush_and_respect_step(size, patch, step):
    (starts,) = window_starts((size,), (patch,), step)
    assert starts[0] == 0 and starts[-1] == size - patch
    assert all(b > a for a, b in itertools.pairwise(starts))
    assert all(b - a <= patch * step + 1 for a, b in itertools.pairwise(starts))
    covered = torch.zeros(size, dtype=torch.bool)
    for s in starts:
        covered[s:s + patch] = True
    assert covered.all()


def test_window_starts_match_nnunet_example():
    assert window_starts((100, 56, 40), (40, 56, 40), 0.5) == [[0, 20, 40, 60], [0], [0]]
    with pytest.raises(ValueError):
        window_starts((10,), (20,), 0.5)


def test_gaussian_map_peaks_in_centre_and_is_positive():
    g = gaussian_importance_map((9, 16, 5))
    assert g.shape == (9, 16, 5) and g.dtype == torch.float32
    assert g.max() == 1.0 and g[4, 7, 2] == g[4, 8, 2] == 1.0
    assert (g > 0).all()
    for axis in range(3):
        assert torch.equal(g, torch.flip(g, [axis]))  # mirror-symmetric, so mirror TTA stays exact


def test_mirror_variants_are_all_subsets():
    assert mirror_variants((0, 1, 2)) == [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]
    assert mirror_variants(()) == [()]


@pytest.mark.parametrize("shape,patch,step", [
    ((23, 31, 17), (16, 16, 16), 0.5),   # not divisible by the step
    ((5, 9, 3), (16, 16, 16), 0.5),      # smaller than the patch on every axis
    ((40, 7, 33), (16, 16, 8), 0.3),     # smaller on one axis only
])
def test_stitching_is_exact_for_a_pointwise_model(shape, patch, step):
    gen = torch.Generator().manual_seed(0)
    data = torch.randn((1, *shape), generator=gen)
    out = sliding_window_predict([Pointwise()], data, patch_size=patch, step=step, mirror_axes=(0, 1, 2), batch_size=3)
    assert out.shape == (3, *shape) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected(data), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.sum(0), torch.ones(shape), atol=1e-5, rtol=0)


def test_mirror_tta_is_equivariant_to_flips():
    gen = torch.Generator().manual_seed(1)
    data = torch.randn((1, 48, 24, 16), generator=gen)  # window starts symmetric on every axis
    model = small_conv(3, 0)
    kw = {"patch_size": (16, 16, 16), "step": 0.5, "mirror_axes": (0, 1, 2), "batch_size": 8}
    out = sliding_window_predict([model], data, **kw)
    for axes in ([1], [2], [1, 3]):
        flipped = sliding_window_predict([model], torch.flip(data, axes), **kw)
        torch.testing.assert_close(torch.flip(flipped, axes), out, atol=1e-5, rtol=1e-4)
    # and without TTA a conv net is not flip-equivariant, so the check above has teeth
    plain = sliding_window_predict([model], data, **{**kw, "mirror_axes": ()})
    plain_f = sliding_window_predict([model], torch.flip(data, [1]), **{**kw, "mirror_axes": ()})
    assert (torch.flip(plain_f, [1]) - plain).abs().max() > 1e-3


def test_two_folds_are_averaged():
    gen = torch.Generator().manual_seed(2)
    data = torch.randn((1, 30, 20, 18), generator=gen)
    a, b = small_conv(3, 1), small_conv(3, 2)
    kw = {"patch_size": (16, 16, 16), "step": 0.5, "mirror_axes": (0,), "batch_size": 4}
    both = sliding_window_predict([a, b], data, **kw)
    pa = sliding_window_predict([a], data, **kw)
    pb = sliding_window_predict([b], data, **kw)
    torch.testing.assert_close(both, (pa + pb) / 2, atol=1e-5, rtol=1e-4)
    assert (pa - pb).abs().max() > 1e-3


def test_batch_size_does_not_change_the_result():
    data = torch.randn((1, 25, 21, 19), generator=torch.Generator().manual_seed(3))
    model = small_conv(3, 3)
    kw = {"patch_size": (16, 16, 16), "step": 0.5, "mirror_axes": (0, 2)}
    ref = sliding_window_predict([model], data, batch_size=1, **kw)
    torch.testing.assert_close(sliding_window_predict([model], data, batch_size=7, **kw), ref, atol=1e-5, rtol=1e-4)


def test_2d_slices_use_the_same_stitching():
    data = torch.randn((1, 20, 37, 9), generator=torch.Generator().manual_seed(4))
    for axis in (0, 2):
        out = sliding_window_predict([Pointwise()], data, patch_size=(16, 16), step=0.5, mirror_axes=(0, 1),
                                     batch_size=5, slice_axis=axis)
        torch.testing.assert_close(out, expected(data), atol=1e-5, rtol=1e-5)


def test_2d_network_sees_whole_slices_when_the_patch_covers_them():
    data = torch.randn((1, 12, 10, 6), generator=torch.Generator().manual_seed(5))
    model = small_conv(2, 4)
    out = sliding_window_predict([model], data, patch_size=(12, 10), step=0.5, slice_axis=2, batch_size=4)
    with torch.no_grad():
        ref = torch.softmax(model(data.permute(3, 0, 1, 2)), dim=1).permute(1, 2, 3, 0)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_bf16_autocast_stays_close_to_fp32():
    data = torch.randn((1, 20, 20, 20), generator=torch.Generator().manual_seed(6))
    model = small_conv(3, 5)
    kw = {"patch_size": (16, 16, 16), "step": 0.5, "batch_size": 4}
    ref = sliding_window_predict([model], data, **kw)
    bf = sliding_window_predict([model], data, amp_dtype=torch.bfloat16, **kw)
    assert bf.dtype == torch.float32
    assert (bf - ref).abs().max() < 0.05


def test_progress_counts_every_window_once():
    seen = []
    data = torch.zeros((1, 30, 16, 16))
    sliding_window_predict([Pointwise()], data, patch_size=(16, 16, 16), step=0.5, mirror_axes=(0, 1),
                           batch_size=3, progress=seen.append)
    assert sum(seen) == len(window_starts((30, 16, 16), (16, 16, 16), 0.5)[0])


def test_slabs_cover_axis_0_once_in_order_and_match_the_whole():
    from medseg3d.inference.sliding_window import sliding_window_slabs

    data = torch.randn((1, 45, 12, 10), generator=torch.Generator().manual_seed(7))
    model = small_conv(3, 6)
    kw = {"patch_size": (16, 16, 16), "step": 0.5, "mirror_axes": (1,), "batch_size": 3}
    slabs = list(sliding_window_slabs([model], data, **kw))
    assert slabs[0][0] == 0 and slabs[-1][1] == 45
    assert all(a[1] == b[0] for a, b in itertools.pairwise(slabs))
    assert all(s.shape == (3, x1 - x0, 12, 10) for x0, x1, s in slabs)
    whole = sliding_window_predict([model], data, **kw)
    torch.testing.assert_close(torch.cat([s for _, _, s in slabs], dim=1), whole)
    assert len(slabs) > 2  # the accumulator really was streamed
