"""Overlap-tile sliding-window inference (pure torch): Gaussian weighting, batched mirror TTA, fold averaging.

Arrays are `(C, X, Y, Z)` images and `(K, X, Y, Z)` class probabilities, in the axis order of the
preprocessed data. The 2D case (`slice_axis` given) runs the same code with a patch of extent 1
along the sliced axis, so stitching, TTA and padding are shared.

Written here rather than with `monai.inferers.sliding_window_inference`: MONAI places windows with
a different rule than nnU-Net (ours puts the last window flush with the end and spreads the rest
evenly), runs mirror TTA as separate calls, and cannot fall back to host accumulation on CUDA OOM.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = ["gaussian_importance_map", "window_starts", "mirror_variants", "sliding_window_predict"]


def gaussian_importance_map(patch_size: Sequence[int], sigma_scale: float = 1.0 / 8) -> torch.Tensor:
    """Gaussian weights `(*patch_size)` float32 peaking at 1 in the patch centre, sigma = patch * sigma_scale.

    Centred at `(n - 1) / 2` so the map is mirror-symmetric (for even patches nnU-Net centres at
    `n // 2`, half a voxel off, which makes flipped inputs give slightly different stitching).

    Zeros (far corners) are raised to the smallest positive weight so every voxel gets some weight.
    """
    g = torch.ones(())
    for n in patch_size:
        n = int(n)
        sigma = max(n * sigma_scale, 1e-6)
        x = torch.arange(n, dtype=torch.float64) - (n - 1) / 2  # symmetric (nnU-Net: n // 2), so TTA is exact
        g = g.unsqueeze(-1) * torch.exp(-0.5 * (x / sigma) ** 2)
    g = g / g.max()
    g = g.to(torch.float32)
    pos = g[g > 0]
    g[g == 0] = pos.min() if pos.numel() else 1.0
    return g


def window_starts(shape: Sequence[int], patch_size: Sequence[int], step: float) -> list[list[int]]:
    """Window start indices per axis covering `shape` with windows of `patch_size` (nnU-Net's rule).

    The target step is `step * patch` voxels; the number of windows per axis is the fewest that
    reach the end with at most that step, and the starts are spread evenly from 0 to
    `shape - patch` (the last window flush with the end). Requires `shape >= patch` on every axis.
    """
    if not 0 < step <= 1:
        raise ValueError(f"step must be in (0, 1], got {step}")
    out = []
    for size, patch in zip(shape, patch_size, strict=True):
        size, patch = int(size), int(patch)
        if size < patch:
            raise ValueError(f"shape {tuple(shape)} is smaller than the patch {tuple(patch_size)}; pad first")
        target = patch * step
        n = int(math.ceil((size - patch) / target)) + 1
        if n == 1:
            out.append([0])
            continue
        actual = (size - patch) / (n - 1)
        out.append([int(round(actual * i)) for i in range(n)])
    return out


def mirror_variants(mirror_axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every subset of `mirror_axes` (identity first): the flips mirror TTA averages over (2^n of them)."""
    axes = sorted({int(a) for a in mirror_axes})
    return [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]


def _pad_amounts(shape: Sequence[int], patch: Sequence[int]) -> list[tuple[int, int]]:
    """(before, after) padding per axis so `shape` reaches at least `patch` (split as nnU-Net does)."""
    out = []
    for s, p in zip(shape, patch):
        d = max(0, int(p) - int(s))
        out.append((d // 2, d - d // 2))
    return out


def _is_cuda_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "CUDA out of memory" in str(exc)


def sliding_window_predict(
    models: Sequence[nn.Module],
    data: torch.Tensor,
    *,
    patch_size: Sequence[int],
    step: float = 0.5,
    mirror_axes: Sequence[int] = (),
    batch_size: int = 4,
    device: str | torch.device = "cpu",
    amp_dtype: torch.dtype | None = None,
    slice_axis: int | None = None,
    progress: Callable[[int], None] | None = None,
    sigma_scale: float = 1.0 / 8,
) -> torch.Tensor:
    """Class probabilities `(K, X, Y, Z)` float32 (on the host) for `data` `(C, X, Y, Z)`.

    models: networks in eval mode returning logits `(B, K, *patch)`; their softmax is averaged
        over models and over every mirror variant, then stitched with Gaussian weights.
    patch_size: 3 ints (3D), or 2 ints for the axes other than `slice_axis` (2D networks; the
        slices are batched through the network).
    step: window step as a fraction of the patch (0.5 = 50% overlap).
    mirror_axes: axes of the patch (0-based; in 2D, of the 2D patch) that TTA flips; all 2^n
        flip combinations of one window are batched into the same forward passes.
    batch_size: network inputs (window x mirror variants) per forward pass.
    device: where the networks run; the probability accumulator lives there too, and moves to
        the host (with a warning) on CUDA out-of-memory.
    amp_dtype: autocast dtype (torch.bfloat16 / torch.float16) or None for float32.
    progress: called with the number of windows finished after each forward pass.
    Volumes smaller than the patch are zero-padded and the result cropped back.
    """
    if data.ndim != 4:
        raise ValueError(f"data must be (C, X, Y, Z), got shape {tuple(data.shape)}")
    if not models:
        raise ValueError("need at least one model")
    device = torch.device(device)
    spatial = tuple(int(s) for s in data.shape[1:])
    if slice_axis is None:
        if len(patch_size) != 3:
            raise ValueError(f"a 3D patch needs 3 sizes, got {tuple(patch_size)}")
        patch = tuple(int(p) for p in patch_size)
        axes3d = (0, 1, 2)
        gauss = gaussian_importance_map(patch, sigma_scale)
    else:
        if len(patch_size) != 2:
            raise ValueError(f"a 2D patch needs 2 sizes, got {tuple(patch_size)}")
        axes3d = tuple(a for a in range(3) if a != slice_axis)
        patch_l = [1, 1, 1]
        for a, p in zip(axes3d, patch_size):
            patch_l[a] = int(p)
        patch = tuple(patch_l)
        gauss = gaussian_importance_map(tuple(int(p) for p in patch_size), sigma_scale).unsqueeze(slice_axis)
    flips = [tuple(axes3d[a] + 2 for a in v) for v in mirror_variants(mirror_axes)]  # dims of (B, C, X, Y, Z)

    pads = _pad_amounts(spatial, patch)
    if any(p != (0, 0) for p in pads):
        flat = [v for pr in reversed(pads) for v in pr]
        data = torch.nn.functional.pad(data, flat, mode="constant", value=0.0)
    padded = tuple(int(s) for s in data.shape[1:])
    steps = window_starts(padded, patch, step if slice_axis is None else step)
    if slice_axis is not None:
        steps[slice_axis] = list(range(padded[slice_axis]))  # every slice exactly once
    windows = list(itertools.product(*steps))

    data = data.to(torch.float32)
    try:
        data_dev = data.to(device)
    except Exception as exc:  # noqa: BLE001 - only CUDA OOM is handled, the rest re-raised
        if not _is_cuda_oom(exc):
            raise
        log.warning("the image does not fit on %s; windows are copied from host memory one batch at a time", device)
        data_dev = data
    num_classes: int | None = None
    acc: torch.Tensor | None = None
    wsum = torch.zeros(padded, dtype=torch.float32, device=device)
    gauss_dev = gauss.to(device)
    scale = 1.0 / (len(models) * len(flips))

    def to_host(reason: BaseException) -> None:
        nonlocal acc, wsum, gauss_dev
        log.warning("CUDA out of memory (%s); accumulating probabilities in host memory instead", str(reason)[:80])
        acc = acc.cpu() if acc is not None else None
        wsum = wsum.cpu()
        gauss_dev = gauss_dev.cpu()
        torch.cuda.empty_cache()

    # (window index, flip index) pairs in window order: the mirrors of one window share a pass
    jobs = [(w, f) for w in range(len(windows)) for f in range(len(flips))]
    amp = (torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype is not None
           else contextlib.nullcontext())
    done_windows = 0
    with torch.no_grad():
        for start in range(0, len(jobs), max(1, batch_size)):
            batch = jobs[start:start + max(1, batch_size)]
            while True:
                try:
                    num_classes, acc = _run_batch(models, data_dev, windows, flips, batch, patch, slice_axis,
                                                  device, amp, acc, wsum, gauss_dev, scale, padded)
                    break
                except Exception as exc:  # noqa: BLE001
                    if device.type != "cuda" or not _is_cuda_oom(exc) or wsum.device.type == "cpu":
                        raise
                    to_host(exc)
            finished = len({w for w, f in batch if f == len(flips) - 1})
            done_windows += finished
            if progress is not None and finished:
                progress(finished)
    assert acc is not None  # at least one window always runs
    acc = acc.cpu()
    acc /= wsum.cpu().unsqueeze(0)
    if any(p != (0, 0) for p in pads):
        acc = acc[(slice(None),) + tuple(slice(b, b + s) for (b, _), s in zip(pads, spatial))]
    return acc.contiguous()


def _windows_slices(start: Sequence[int], patch: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(s, s + p) for s, p in zip(start, patch))


def _run_batch(models, data_dev, windows, flips, batch, patch, slice_axis, device, amp, acc, wsum, gauss_dev,
               scale, padded):
    """One forward pass per model over `batch` (window, flip) pairs; adds weighted softmax into `acc`."""
    inputs = []
    for w, f in batch:
        x = data_dev[(slice(None),) + _windows_slices(windows[w], patch)]
        inputs.append(x)
    x = torch.stack(inputs).to(device, non_blocking=True)
    x = torch.stack([torch.flip(xi, [d - 1 for d in flips[f]]) if flips[f] else xi
                     for xi, (_, f) in zip(x, batch)])
    if slice_axis is not None:
        x = x.squeeze(slice_axis + 2)
    probs = None
    for model in models:
        with amp:
            logits = model(x)
        if isinstance(logits, (list, tuple)):
            logits = logits[0]
        p = torch.softmax(logits.float(), dim=1)
        probs = p if probs is None else probs + p
    if slice_axis is not None:
        probs = probs.unsqueeze(slice_axis + 2)
    num_classes = int(probs.shape[1])
    if acc is None:
        acc = torch.zeros((num_classes, *padded), dtype=torch.float32, device=wsum.device)
    g = gauss_dev
    for i, (w, f) in enumerate(batch):
        p = probs[i]
        if flips[f]:
            p = torch.flip(p, [d - 1 for d in flips[f]])
        sl = _windows_slices(windows[w], patch)
        p = p.to(acc.device)
        acc[(slice(None),) + sl].add_(p * (g * scale))
        if f == 0:
            wsum[sl].add_(g)
    return num_classes, acc
