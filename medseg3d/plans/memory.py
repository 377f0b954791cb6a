"""Memory model of a training step: measured on CUDA, analytic (calibrated) elsewhere.

`activation_elements` counts the feature-map elements one sample produces in a plain U-Net (two
conv blocks per stage, strided-conv down, transposed-conv up, deep-supervision heads): the same
count nnU-Net's `compute_conv_feature_map_size` makes. `analytic_bytes` turns it into bytes with a
per-element cost calibrated to nnU-Net's reference (8 GB holds a batch of 2 at 560 M elements in
3D, 12 at 85 M in 2D); docs/planning.md has the CPU measurements behind it and states that the
CUDA calibration awaits a GPU session. `cuda_trial_bytes` runs a real AMP forward+backward.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from functools import lru_cache

log = logging.getLogger(__name__)

GIB = 1024**3
#: Bytes per feature-map element per sample during an AMP training step (nnU-Net's calibration:
#: 8 GiB / (560e6 * 2 / 2) in 3D, 8 GiB / (85e6 * 12 / 2) in 2D, with a batch of 2 as the unit).
BYTES_PER_ELEMENT = {3: 8 * GIB / (560e6 * 2), 2: 8 * GIB / (85e6 * 12)}
DEFAULT_BUDGET_GB = 8.0


def activation_elements(
    patch: Sequence[int], strides: Sequence[Sequence[int]], features: Sequence[int], num_classes: int,
    deep_supervision: bool = True,
) -> int:
    """Feature-map elements of one sample through a plain U-Net (encoder + decoder + heads).

    patch: spatial patch `(X, Y, Z)` or `(X, Y)`; strides/features per stage.
    """
    sizes = []
    size = list(patch)
    for s in strides:
        size = [a // b for a, b in zip(size, s)]
        sizes.append(size)
    total = 0
    for f, sz in zip(features, sizes):  # encoder: two convs per stage at the stage's resolution
        total += 2 * f * math.prod(sz)
    n = len(strides)
    for s in range(n - 1):  # decoder stage from lowest to highest resolution
        skip = sizes[n - 2 - s]
        f = features[n - 2 - s]
        total += 2 * f * math.prod(skip)  # two convs
        total += f * math.prod(skip)      # transposed conv output
        if deep_supervision or s == n - 2:
            total += num_classes * math.prod(skip)
    return int(total)


def analytic_bytes(
    patch: Sequence[int], strides: Sequence[Sequence[int]], features: Sequence[int], batch: int, num_classes: int,
) -> float:
    """Estimated peak bytes of a training step (AMP) at `batch` patches of `patch` voxels."""
    dims = len(patch)
    return float(batch) * activation_elements(patch, strides, features, num_classes) * BYTES_PER_ELEMENT[dims]


def cuda_available() -> bool:
    """True when a CUDA device can be used; torch (slow to import) is only imported where a driver exists."""
    from pathlib import Path

    if not any(Path("/dev").glob("nvidia*")) and not Path("/proc/driver/nvidia").exists():
        return False
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception as exc:  # noqa: BLE001 (a broken CUDA set-up counts as none)
        log.debug("CUDA unusable: %s", exc)
        return False


def default_budget_gb() -> float:
    """Total memory of the current CUDA device in GiB, rounded down to a whole GiB; else 8.

    The total, not the free memory of the moment (as nnU-Net's fixed per-GPU target): two runs of
    `medseg3d plan` on the same data and machine then write the same plan, whatever else runs.
    """
    if not cuda_available():
        return DEFAULT_BUDGET_GB
    try:
        import torch

        if torch.cuda.is_available():
            total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
            return float(max(1, math.floor(total / GIB)))
    except Exception as exc:  # noqa: BLE001 (a broken CUDA set-up falls back to the default)
        log.debug("no CUDA memory info: %s", exc)
    return DEFAULT_BUDGET_GB


def trial_step(net, batch: int, in_channels: int, patch: Sequence[int], device, amp_dtype) -> None:  # noqa: ANN001
    """One training step of `net` (forward with autocast `amp_dtype`, backward, SGD step) on random data."""
    import torch

    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.99, nesterov=True)
    x = torch.randn(batch, in_channels, *patch, device=device)
    with torch.autocast(device.type, dtype=amp_dtype):
        out = net(x)
        outs = out if isinstance(out, (list, tuple)) else [out]
        loss = sum(o.float().mean() for o in outs)
    loss.backward()
    opt.step()


def build_trial_network(arch: str, patch: Sequence[int], strides, kernels, features, in_channels: int,  # noqa: ANN001
                        num_classes: int, options: dict | None = None):
    """The network the plan describes, with deep supervision, in training mode."""
    from medseg3d.networks import build_network

    return build_network(arch, in_channels=in_channels, num_classes=num_classes, dims=len(patch),
                         strides=[list(s) for s in strides], kernel_sizes=[list(k) for k in kernels],
                         features=list(features), patch_size=list(patch), deep_supervision=True,
                         options=options).train()


def _hashable(options: dict | None) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in (options or {}).items()))


@lru_cache(maxsize=1024)
def _meta_saved(arch: str, patch: tuple[int, ...], strides: tuple, kernels: tuple, features: tuple,
                in_channels: int, num_classes: int, options: tuple) -> int:
    import torch

    with torch.device("meta"):
        net = build_trial_network(arch, patch, strides, kernels, features, in_channels, num_classes,
                                  {k: list(v) if isinstance(v, tuple) else v for k, v in options})
        x = torch.empty(1, in_channels, *patch)
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(x)
    return total


def saved_activation_bytes(
    arch: str, patch: Sequence[int], strides: Sequence[Sequence[int]], kernels: Sequence[Sequence[int]],
    features: Sequence[int], in_channels: int, num_classes: int, options: dict | None = None,
) -> int:
    """Bytes the autograd graph of one training sample saves for backward (fp32), measured on the
    `meta` device: the architecture actually built, traced in milliseconds without allocating or
    computing anything. Cached per shape."""
    return _meta_saved(str(arch), tuple(int(p) for p in patch), tuple(map(tuple, strides)),
                       tuple(map(tuple, kernels)), tuple(int(f) for f in features), int(in_channels),
                       int(num_classes), _hashable(options))


@lru_cache(maxsize=256)
def _cuda_trial(arch: str, patch: tuple[int, ...], strides: tuple, kernels: tuple, features: tuple,
                batch: int, in_channels: int, num_classes: int, options: tuple = ()) -> float:
    import torch

    dev = torch.device("cuda")
    net = build_trial_network(arch, patch, strides, kernels, features, in_channels, num_classes,
                              {k: list(v) if isinstance(v, tuple) else v for k, v in options}).to(dev)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    try:
        trial_step(net, batch, in_channels, patch, dev, torch.float16)
        torch.cuda.synchronize(dev)
        return float(torch.cuda.max_memory_allocated(dev))
    except torch.cuda.OutOfMemoryError:
        return math.inf
    finally:
        del net
        torch.cuda.empty_cache()


def cuda_trial_bytes(
    arch: str, patch: Sequence[int], strides: Sequence[Sequence[int]], kernels: Sequence[Sequence[int]],
    features: Sequence[int], batch: int, in_channels: int, num_classes: int, options: dict | None = None,
) -> float:
    """Peak CUDA bytes of one AMP forward+backward+SGD step (inf on out-of-memory); cached per shape."""
    return _cuda_trial(arch, tuple(patch), tuple(map(tuple, strides)), tuple(map(tuple, kernels)),
                       tuple(features), int(batch), int(in_channels), int(num_classes), _hashable(options))


def make_memory_fn(num_classes: int, in_channels: int, arch: str = "unet", measure_cuda: bool = False,
                   options: dict | None = None):
    """`memory_fn(patch, strides, kernels, features, batch) -> bytes` for `rules.plan_topology_and_patch`.

    measure_cuda: run a real trial on the current CUDA device (architecture `arch`). Else the U-Net
    is analytic (nnU-Net's calibrated count); any other architecture is the analytic U-Net bytes
    scaled by the ratio of what the two networks' autograd graphs save for one sample at the same
    patch and topology (`saved_activation_bytes`, traced on the meta device): its own memory, in
    the units the calibration gives.
    """

    def analytic(patch, strides, kernels, features, batch):
        return analytic_bytes(patch, strides, features, batch, num_classes)

    def scaled(patch, strides, kernels, features, batch):
        own = saved_activation_bytes(arch, patch, strides, kernels, features, in_channels, num_classes, options)
        ref = saved_activation_bytes("unet", patch, strides, kernels, features, in_channels, num_classes)
        return analytic(patch, strides, kernels, features, batch) * own / max(1, ref)

    if not measure_cuda:
        return analytic if arch == "unet" else scaled

    def measured(patch, strides, kernels, features, batch):
        # measured at batch 2 (the unit of the budget rule), scaled linearly per sample
        two = cuda_trial_bytes(arch, patch, strides, kernels, features, 2, in_channels, num_classes, options)
        return two / 2 * batch

    return measured
