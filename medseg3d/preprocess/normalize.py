"""Per-channel intensity normalisation, by scheme: `zscore`, `ct`, `rescale`, `none`.

`zscore`: per image `(x - mean) / std` of that image's channel (with `use_mask`, statistics from
the non-zero region only and 0 outside it, as nnU-Net does when cropping removed much of the image). `ct`: clip to the dataset's
foreground `[lower, upper]` (0.5 / 99.5 percentiles) then z-score with the dataset foreground
mean/std. `rescale`: clip to `[lower, upper]` and map linearly to `[0, 1]`. `none`: unchanged.
"""

from __future__ import annotations

from typing import Any

import numpy as np

SCHEMES = ("zscore", "ct", "rescale", "none")


def normalize_channel(x: np.ndarray, norm: dict[str, Any], mask: np.ndarray | None = None) -> np.ndarray:
    """Normalise one channel `x` (any spatial shape) per `norm` (an entry of plan `normalization`).

    mask: boolean, same shape as `x`, the non-zero region; used by `zscore` when `norm["use_mask"]`.
    Returns float32; `x` is not modified.
    """
    scheme = norm.get("scheme", "zscore")
    x = x.astype(np.float32, copy=True)
    if scheme == "zscore" and norm.get("use_mask") and mask is not None and mask.any():
        inside = x[mask]
        mean, std = float(inside.mean()), float(inside.std())
        x = np.where(mask, (x - mean) / max(std, 1e-8), 0.0).astype(np.float32)
    elif scheme == "zscore":
        mean, std = float(x.mean()), float(x.std())
        x -= mean
        x /= max(std, 1e-8)
    elif scheme == "ct":
        np.clip(x, norm["lower"], norm["upper"], out=x)
        x -= float(norm["mean"])
        x /= max(float(norm["std"]), 1e-8)
    elif scheme == "rescale":
        lo, hi = float(norm["lower"]), float(norm["upper"])
        np.clip(x, lo, hi, out=x)
        x -= lo
        x /= max(hi - lo, 1e-8)
    elif scheme != "none":
        raise ValueError(f"unknown normalisation scheme {scheme!r}; valid: {', '.join(SCHEMES)}")
    return x


def normalize(data: np.ndarray, normalization: list[dict[str, Any]], mask: np.ndarray | None = None) -> np.ndarray:
    """Normalise an image `(C, X, Y, Z)` channel by channel; returns float32 `(C, X, Y, Z)`.

    mask: boolean `(X, Y, Z)` non-zero region, for the entries with `use_mask`.
    """
    if len(normalization) != data.shape[0]:
        raise ValueError(f"{len(normalization)} normalisation entries for {data.shape[0]} channels")
    out = np.empty(data.shape, dtype=np.float32)
    for c, norm in enumerate(normalization):
        out[c] = normalize_channel(data[c], norm, mask)
    return out
