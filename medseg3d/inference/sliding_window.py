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
import functools
import itertools
import logging
import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = [
    "gaussian_importance_map",
    "mirror_variants",
    "sliding_window_predict",
    "sliding_window_slabs",
    "window_starts",
]


def gaussian_importance_map(patch_size: Sequence[int], sigma_scale: float = 1.0 / 8) -> torch.Tensor:
    """Gaussian weights `(*patch_size)` float32 peaking at 1 in the patch centre, sigma = patch * sigma_scale.

    Centred at `(n - 1) / 2` so the map is mirror-symmetric (for even patches nnU-Net centres at
    `n // 2`, half a voxel off, which makes flipped inputs give slightly different stitching).

    Zeros (far corners) are raised to the smallest positive weight so every voxel gets some weight.
    Computed once per (patch, sigma) and copied out (predict calls it for every case).
    """
    return _gaussian(tuple(int(n) for n in patch_size), float(sigma_scale)).clone()


@functools.lru_cache(maxsize=8)
def _gaussian(patch_size: tuple[int, ...], sigma_scale: float) -> torch.Tensor:
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
    This assembles the slabs of `sliding_window_slabs`; use that to keep memory bounded.
    """
    out: torch.Tensor | None = None
    for x0, x1, slab in sliding_window_slabs(
        models, data, patch_size=patch_size, step=step, mirror_axes=mirror_axes, batch_size=batch_size,
        device=device, amp_dtype=amp_dtype, slice_axis=slice_axis, progress=progress, sigma_scale=sigma_scale,
    ):
        if out is None:
            out = torch.empty((slab.shape[0], *data.shape[1:]), dtype=torch.float32)
        out[:, x0:x1] = slab
    assert out is not None  # the stream always covers axis 0
    return out


def sliding_window_slabs(
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
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """`sliding_window_predict` as a stream of finished slabs along axis 0: yields `(x0, x1, probs)`
    with `probs` `(K, x1 - x0, Y, Z)` float32 on the host, in order, covering `[0, X)` exactly once.

    Windows run in axis-0 order; the accumulator holds only one patch extent along axis 0
    (`K x patch_x x Y x Z` float32), and voxels no later window touches are normalised and handed
    out. Arguments as `sliding_window_predict`.
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
    steps = window_starts(padded, patch, step)
    if slice_axis is not None:
        steps[slice_axis] = list(range(padded[slice_axis]))  # every slice exactly once
    data = data.to(torch.float32)
    try:
        data_dev = data.to(device)
    except Exception as exc:
        if not _is_cuda_oom(exc):
            raise
        log.warning("the image does not fit on %s; windows are copied from host memory one batch at a time", device)
        data_dev = data
    state = _Accumulator(patch, padded, gauss, device)
    scale = 1.0 / (len(models) * len(flips))
    amp = (torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype is not None
           else contextlib.nullcontext())
    inner = list(itertools.product(*steps[1:]))
    starts0 = steps[0]
    keep = tuple(slice(b, b + s) for (b, _), s in zip(pads[1:], spatial[1:]))  # unpadded part of axes 1, 2
    with torch.no_grad():
        for i, s0 in enumerate(starts0):
            windows = [(s0, *w) for w in inner]
            jobs = [(w, f) for w in range(len(windows)) for f in range(len(flips))]  # mirrors share a pass
            for b in range(0, len(jobs), max(1, batch_size)):
                batch = jobs[b:b + max(1, batch_size)]
                while True:
                    try:
                        _run_batch(models, data_dev, windows, flips, batch, patch, slice_axis, amp, state, s0, scale,
                                   device)
                        break
                    except Exception as exc:
                        if device.type != "cuda" or not _is_cuda_oom(exc) or state.on_host:
                            raise
                        state.to_host(exc)
                finished = sum(1 for _, f in batch if f == len(flips) - 1)
                if progress is not None and finished:
                    progress(finished)
            d = (starts0[i + 1] - s0) if i + 1 < len(starts0) else patch[0]
            slab = state.pop(d)  # (K, d, Y', Z') padded coordinates [s0, s0 + d)
            lo, hi = max(s0, pads[0][0]), min(s0 + d, pads[0][0] + spatial[0])
            if hi > lo:
                yield lo - pads[0][0], hi - pads[0][0], slab[(slice(None), slice(lo - s0, hi - s0)) + keep].contiguous()


class _Accumulator:
    """Weighted probability sums for one patch extent along axis 0, starting at the current window row."""

    def __init__(self, patch: tuple[int, ...], padded: tuple[int, ...], gauss: torch.Tensor, device: torch.device):
        self.shape = (patch[0], *padded[1:])
        self.acc: torch.Tensor | None = None  # (K, patch_x, Y', Z'), made at the first output
        self.wsum = torch.zeros(self.shape, dtype=torch.float32, device=device)
        self.gauss = gauss.to(device)

    @property
    def on_host(self) -> bool:
        return self.wsum.device.type == "cpu"

    def to_host(self, reason: BaseException) -> None:
        log.warning("CUDA out of memory (%s); accumulating probabilities in host memory instead", str(reason)[:80])
        self.acc = self.acc.cpu() if self.acc is not None else None
        self.wsum, self.gauss = self.wsum.cpu(), self.gauss.cpu()
        torch.cuda.empty_cache()

    def add(self, probs: torch.Tensor, sl: tuple[slice, ...], weight_too: bool, scale: float) -> None:
        if self.acc is None:
            self.acc = torch.zeros((probs.shape[0], *self.shape), dtype=torch.float32, device=self.wsum.device)
        self.acc[(slice(None),) + sl].add_(probs.to(self.acc.device) * (self.gauss * scale))
        if weight_too:
            self.wsum[sl].add_(self.gauss)

    def pop(self, d: int) -> torch.Tensor:
        """Normalised probabilities of the first `d` rows (host float32); the buffer shifts by `d`."""
        assert self.acc is not None
        out = (self.acc[:, :d] / self.wsum[:d].unsqueeze(0)).cpu()
        n = self.shape[0]
        if d < n:
            self.acc[:, : n - d] = self.acc[:, d:].clone()
            self.wsum[: n - d] = self.wsum[d:].clone()
        self.acc[:, max(0, n - d):] = 0
        self.wsum[max(0, n - d):] = 0
        return out


def _run_batch(models, data_dev, windows, flips, batch, patch, slice_axis, amp, state: _Accumulator, s0: int,
               scale: float, device: torch.device) -> None:
    """One forward pass per model over `batch` (window, flip) pairs; adds weighted softmax into `state`."""
    x = torch.stack([data_dev[(slice(None),) + _window_slices(windows[w], patch)] for w, _ in batch])
    x = x.to(device, non_blocking=True)
    x = torch.stack([torch.flip(xi, [d - 1 for d in flips[f]]) if flips[f] else xi for xi, (_, f) in zip(x, batch)])
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
        del logits
    if slice_axis is not None:
        probs = probs.unsqueeze(slice_axis + 2)
    for i, (w, f) in enumerate(batch):
        p = torch.flip(probs[i], [d - 1 for d in flips[f]]) if flips[f] else probs[i]
        start = (windows[w][0] - s0, *windows[w][1:])  # axis 0 relative to the buffer
        state.add(p, _window_slices(start, patch), f == 0, scale)


def _window_slices(start: Sequence[int], patch: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(s, s + p) for s, p in zip(start, patch))
