"""One case through the trained networks and back to its original geometry, with bounded host memory.

`predict_case` is shared by `medseg3d predict` and training's final validation. Images are `Volume`s
with arrays `(C, X, Y, Z)` in file index order; the segmentation comes back `(X, Y, Z)` in the input's
own voxel grid (so it is written with the input's exact header).

Memory: the sliding window streams finished slabs (its accumulator is one patch deep along the
first axis). Without resampling each slab is argmaxed at once; otherwise slabs go to a float16
`K x N'` store at the network's spacing, and classes are resampled to the original grid one at a
time into a running max + argmax. `K x N` float32 at full resolution is never held (except for
`return_probabilities`). See docs/inference.md.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from medseg3d.device import resolve_device
from medseg3d.errors import ConfigError, InputError
from medseg3d.inference.sliding_window import sliding_window_slabs
from medseg3d.preprocess.crop import uncrop
from medseg3d.preprocess.pipeline import preprocess_arrays, probs_to_original
from medseg3d.preprocess.resample import linear_rows, separate_axis_for

if TYPE_CHECKING:
    from medseg3d.io.volume import Volume
    from medseg3d.plans.schema import Plans

log = logging.getLogger(__name__)

__all__ = [
    "check_input",
    "default_batch_size",
    "predict_case",
    "probabilities_to_seg",
    "resolve_amp",
]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_amp(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for `precision` (auto|fp32|bf16|fp16) on `device`; None means float32.

    `auto`: float16 on CUDA (as nnU-Net), bfloat16 on a CPU with native bf16 support (about 2x
    faster there, same Dice on a trained model, docs/benchmarks.md), else float32 (emulated bf16
    is many times slower).
    """
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.float16
    try:
        bf16_ok = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        bf16_ok = False
    return torch.bfloat16 if bf16_ok else None


#: Voxels per forward pass (windows x mirror variants) the default batch size aims for: batching
#: small patches paid on session 2's AVX-512-bf16 CPU (8 hippocampus patches cost 1.3 s each vs 2.9 s
#: one by one in bf16) and pays on a GPU, while a 128^3 patch is already a large GEMM and a batch of 8
#: of them would hold gigabytes of activations.
BATCH_VOXELS = 2**21
#: First-stage width from which a 3D fp32 network predicts one window at a time on a CPU without AVX-512.
CPU_SINGLE_WINDOW_FEATURES = 32


def default_batch_size(patch_size: Sequence[int], dims: int, device: torch.device | None = None,
                       amp_dtype: torch.dtype | None = None, first_features: int | None = None) -> int:
    """Network inputs per forward pass: `BATCH_VOXELS / patch voxels`, at least 1, at most 8 (3D) / 32 (2D).

    3D in float32 on a CPU without AVX-512 (`device` cpu, no `amp_dtype`) with a network of
    `first_features` >= `CPU_SINGLE_WINDOW_FEATURES` in its first stage: 1. Measured on the 2-core AVX2
    CPU (`benchmarks/bench_window_batch.py`, patch 40x56x40, 2 threads, seconds per patch at batch 1 /
    8): 32-256 features 0.365 / 0.584 (batching the 8 mirror variants made `predict` with TTA 1.5x
    slower than nnU-Net's one-at-a-time passes), 16-128 0.178 / 0.150, 8-64 0.269 / 0.055, 4-16
    0.176 / 0.029: narrower networks batch well, nnU-Net's width does not. Session 7's AVX-512-bf16
    CPU ran the 32-256 network's batch of 8 in fp32 at 1.44x nnU-Net (docs/benchmarks.md,
    "Prediction", "Network backends").
    """
    if (dims == 3 and device is not None and device.type == "cpu" and amp_dtype is None and not _wide_simd_cpu()
            and first_features is not None and first_features >= CPU_SINGLE_WINDOW_FEATURES):
        return 1
    return int(max(1, min(8 if dims == 3 else 32, BATCH_VOXELS // int(np.prod(patch_size)))))


def _first_width(models: Sequence[nn.Module]) -> int | None:
    """Output channels of the first network's first convolution (None for an exported backend's network)."""
    for m in models[0].modules() if models else ():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            return int(m.out_channels)
    return None


def _wide_simd_cpu() -> bool:
    """True where torch's CPU kernels use AVX-512 (batched windows were measured faster there)."""
    return str(torch.backends.cpu.get_cpu_capability()).upper().startswith("AVX512")


def check_input(image: Volume, plans: Plans, case: str = "") -> None:
    """InputError naming the case when channels, dimensionality or spacing do not suit the model."""
    who = f"case {case}: " if case else ""
    if image.ndim != 3:
        raise InputError(f"{who}image has {image.ndim} spatial dimensions {image.spatial_shape}; the model needs 3D "
                         "volumes (a 2d configuration still takes 3D volumes and slices them)")
    if image.num_channels != plans.num_channels:
        raise InputError(f"{who}image has {image.num_channels} channel(s), the model was planned with "
                         f"{plans.num_channels} ({', '.join(plans.channel_names)}); give every channel")
    spacing = np.asarray(image.spacing, dtype=float)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise InputError(f"{who}voxel spacing {tuple(spacing)} mm is not positive and finite; fix the affine "
                         "(pixdim/sform) of the file")
    if not np.all(np.isfinite(image.array)):
        raise InputError(f"{who}image holds NaN or Inf voxels; fix or mask them before predicting")


#: Voxels of the original grid resampled per export slab (16 MB per float32 class map).
_EXPORT_SLAB_VOXELS = 1 << 22


def probabilities_to_seg(probs: np.ndarray, properties: dict[str, Any]) -> np.ndarray:
    """Probabilities `(K, X', Y', Z')` (float16/32) at network spacing -> labels `(X, Y, Z)` uint8 in the original grid.

    Bounded memory: the cropped original grid is filled one slab of first-axis rows at a time
    (about `_EXPORT_SLAB_VOXELS` voxels); within a slab each class is resampled linearly from just
    the rows of `probs` it needs into a running max + argmax. Beyond `probs` itself, only the uint8
    result (cropped and uncropped) is full-sized. Linear resampling is separable, so no axis needs
    handling on its own (anisotropic data included): the result is the trilinear resampling that
    per-axis linear passes give.
    """
    crop_shape = tuple(int(s) for s in properties["shape_after_crop"])
    dtype = np.uint8 if probs.shape[0] <= 256 else np.uint16
    seg_c = np.empty(crop_shape, dtype=dtype)
    if tuple(probs.shape[1:]) == crop_shape:  # slab by slab: np.argmax alone makes an int64 full-size temporary
        for x in range(0, crop_shape[0], 16):
            seg_c[x:x + 16] = np.argmax(probs[:, x:x + 16], axis=0)
    else:
        rows = max(1, _EXPORT_SLAB_VOXELS // max(1, int(np.prod(crop_shape[1:]))))
        for x0 in range(0, crop_shape[0], rows):
            x1 = min(crop_shape[0], x0 + rows)
            best = linear_rows(probs[0], crop_shape, x0, x1)
            slab = np.zeros(best.shape, dtype=dtype)
            for k in range(1, probs.shape[0]):
                res = linear_rows(probs[k], crop_shape, x0, x1)
                win = res > best
                slab[win] = k
                np.maximum(best, res, out=best)
            seg_c[x0:x1] = slab
    return uncrop(seg_c, properties["bbox"], tuple(int(s) for s in properties["original_shape"]), fill=0)


def predict_case(
    models: Sequence[nn.Module],
    image: Volume,
    plans: Plans,
    config_name: str,
    *,
    step: float = 0.5,
    use_mirroring: bool = True,
    device: str | torch.device = "cpu",
    postprocessing: dict | None = None,
    return_probabilities: bool = False,
    precision: str = "auto",
    batch_size: int | None = None,
    progress: Callable[[int], None] | None = None,
    case: str = "",
    arch: str | None = None,
    previous_models: Sequence[nn.Module] | None = None,
    previous_seg: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Segment one image with the average of `models` (fold networks in eval mode).

    image: `Volume` `(C, X, Y, Z)` as read from disk (any affine); plans/config_name: the plan the
    models were trained with. Steps: `preprocess_arrays` (exactly what the cache writer did for
    training: crop, normalise, resample to the plan's spacing), sliding
    window (Gaussian weights, `step` x patch, mirror TTA over the plan's `mirror_axes` when
    `use_mirroring`, softmax averaged over models), back to the original grid, uncrop,
    largest-component `postprocessing` (decision dict or None).
    `arch`: the models' architecture (default: the plan's), whose planned patch the window uses.
    A cascade configuration (`previous_stage` set, `medseg3d.cascade`) takes the previous stage's
    labels `(X, Y, Z)` on the image's grid: `previous_seg`, or computed here first with
    `previous_models` (the previous stage's fold networks, same settings); they are preprocessed like
    a label and appended one-hot (K - 1 channels) to the image.
    Returns `(seg (X, Y, Z) uint8, probabilities (K, X, Y, Z) float32 or None)`; the probabilities
    (only with `return_probabilities`) are the one full-resolution K-class array this makes.
    """
    check_input(image, plans, case)
    config = plans.configuration(config_name).for_architecture(arch)
    if config.previous_stage and previous_seg is None:
        if not previous_models:
            raise ConfigError(f"{config_name} needs the {config.previous_stage} segmentation of case {case or 'the image'}:"
                              f" give the {config.previous_stage} models or --previous-stage DIR")
        previous_seg, _ = predict_case(previous_models, image, plans, config.previous_stage, step=step,
                                       use_mirroring=use_mirroring, device=device, precision=precision,
                                       batch_size=batch_size, case=case, arch=arch)
    dev = resolve_device(device)
    amp = resolve_amp(precision, dev)
    arr, spacing = image.array, tuple(image.spacing)
    del image  # when the caller passed its only reference (predict_folder does), `arr` is the last one
    box = [arr]
    del arr  # the list holds the last reference: preprocessing frees the input before resampling
    prev = None
    if config.previous_stage:
        prev = np.asarray(previous_seg)
        if prev.shape != tuple(box[0].shape[1:]):
            raise InputError(f"case {case}: the {config.previous_stage} segmentation has shape {prev.shape}, the image "
                             f"{tuple(box[0].shape[1:])}; give the previous stage's prediction of this very image")
        prev = prev.astype(np.int8)
    pre = preprocess_arrays(box, spacing, config, seg=prev, classes=[])
    props = pre.properties
    data = torch.from_numpy(pre.data)
    if prev is not None:
        from medseg3d.cascade import one_hot_foreground

        data = torch.cat((data, one_hot_foreground(torch.from_numpy(pre.seg.astype(np.int64))[None],
                                                   plans.num_classes)[0]), dim=0)
    del pre, prev
    if batch_size is None:
        batch_size = default_batch_size(config.patch_size, config.dims, dev, amp, _first_width(models))
    stream = sliding_window_slabs(
        models, data, patch_size=config.patch_size, step=step,
        mirror_axes=config.mirror_axes if use_mirroring else (), batch_size=batch_size, device=dev,
        amp_dtype=amp, slice_axis=config.slice_axis, progress=progress,
    )
    sep = config.resampling.get("separate_axis")
    if sep is None:
        sep = separate_axis_for(props["original_spacing"], props["spacing"])
    net_shape = tuple(int(s) for s in data.shape[1:])
    del data
    crop_shape = tuple(int(s) for s in props["shape_after_crop"])
    full_probs = None
    if net_shape == crop_shape:  # no resampling: argmax slab by slab, nothing K-sized is kept
        seg_c = np.empty(crop_shape, dtype=np.uint8)
        probs_c = np.empty((plans.num_classes, *crop_shape), np.float32) if return_probabilities else None
        for x0, x1, slab in stream:
            seg_c[x0:x1] = slab.argmax(0).numpy()
            if probs_c is not None:
                probs_c[:, x0:x1] = slab.numpy()
        seg = uncrop(seg_c, props["bbox"], tuple(int(s) for s in props["original_shape"]), fill=0)
        if probs_c is not None:
            full_probs = probs_to_original(probs_c, props, sep)
    else:  # float16 store at network spacing, then one class at a time to the original grid
        store = np.empty((plans.num_classes, *net_shape), dtype=np.float16)
        for x0, x1, slab in stream:
            store[:, x0:x1] = slab.numpy()
        seg = probabilities_to_seg(store, props)
        if return_probabilities:
            full_probs = probs_to_original(store.astype(np.float32), props, sep)
        del store
    if postprocessing:
        from medseg3d.postprocess import apply_postprocessing

        seg = apply_postprocessing(seg, postprocessing)
    return seg, full_probs
