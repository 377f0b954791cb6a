"""Fingerprint -> Plans: applies the pure rules of `rules.py` with a memory model from `memory.py`.

Configurations: `3d_fullres` (unless the data is thin/2D-like), `2d` (always; its own cache, in-plane
at 3d_fullres' spacing, the slice axis at each case's own spacing, as nnU-Net), and `3d_lowres` + `3d_cascade_fullres` when the fullres patch covers less than a quarter of
the median image. Axis order is the array order `(X, Y, Z)`: nothing is transposed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from medseg3d import __version__
from medseg3d.errors import ConfigError, PlanError
from medseg3d.geometry import anisotropic_axis, compute_new_shape
from medseg3d.plans import rules
from medseg3d.plans.memory import GIB, make_memory_fn
from medseg3d.plans.schema import SCHEMA_VERSION, Plans

log = logging.getLogger(__name__)

ALL_CONFIGS = ("2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres")


def dataset_hash(fingerprint: dict[str, Any]) -> str:
    """sha256 of the sorted case list and the fingerprint (the cases' geometry and statistics)."""
    names = sorted(c["name"] for c in fingerprint.get("cases", []))
    blob = json.dumps({"cases": names, "fingerprint": fingerprint}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _median_shape_after_resampling(fingerprint: dict[str, Any], spacing: Sequence[float]) -> list[float]:
    shapes = [compute_new_shape(s, sp, spacing) for s, sp in zip(fingerprint["shapes_after_crop"], fingerprint["spacings"])]
    return [float(v) for v in np.median(np.asarray(shapes, dtype=float), axis=0)]


def _configuration(
    dims: int, spacing: list[float], median_shape: list[float], data_identifier: str, normalization: list[dict],
    memory_fn: Any, budget_bytes: float, n_voxels: float, arch: str, slice_axis: int | None,
    full_spacing: list[float], full_median: list[float],
) -> dict[str, Any]:
    axes = list(range(3)) if slice_axis is None else [a for a in range(3) if a != slice_axis]
    sp = [spacing[a] for a in axes]
    med = [max(1, int(round(median_shape[a]))) for a in axes]
    topo = rules.plan_topology_and_patch(sp, med, memory_fn, budget_bytes, n_voxels)
    sep = anisotropic_axis(full_spacing)
    return {
        "dims": dims,
        "spacing": [float(s) for s in (spacing if slice_axis is None else full_spacing)],
        "slice_axis": slice_axis,
        "data_identifier": data_identifier,
        "patch_size": topo["patch_size"],
        "batch_size": topo["batch_size"],
        "strides": topo["strides"],
        "kernel_sizes": topo["kernel_sizes"],
        "features": topo["features"],
        "normalization": copy.deepcopy(normalization),
        "architecture": arch,
        "mirror_axes": list(range(dims)),
        "median_shape": [int(round(v)) for v in (median_shape if slice_axis is None else full_median)],
        # 2d keeps each case's own spacing along the slice axis (nnU-Net's rule): `native_axis`
        "resampling": {"image_order": 3, "label_mode": "linear_onehot", "separate_axis": sep,
                       **({} if slice_axis is None else {"native_axis": slice_axis})},
        "previous_stage": None,
        "next_stage": None,
        "estimated_memory_gb": round(topo["estimated_bytes"] / GIB, 3),
    }


def _architecture_entry(config: dict[str, Any], arch: str, options: dict[str, Any], memory_fn: Any,
                        budget_bytes: float, n_cases: int) -> dict[str, Any]:
    """Patch, batch and topology of `config` re-planned for architecture `arch`'s own memory.

    Same rules as the U-Net plan (the same spacing, median shape and budget), with `memory_fn`
    measuring `arch` as built with `options`; stored under the configuration's `architectures`.
    """
    slice_axis = config["slice_axis"]
    axes = list(range(3)) if slice_axis is None else [a for a in range(3) if a != slice_axis]
    sp = [config["spacing"][a] for a in axes]
    med = [max(1, int(config["median_shape"][a])) for a in axes]
    n_vox = float(np.prod(config["median_shape"], dtype=np.float64)) * n_cases
    topo = rules.plan_topology_and_patch(sp, med, memory_fn, budget_bytes, n_vox)
    return {"patch_size": topo["patch_size"], "batch_size": topo["batch_size"], "strides": topo["strides"],
            "kernel_sizes": topo["kernel_sizes"], "features": topo["features"], "options": options,
            "estimated_memory_gb": round(topo["estimated_bytes"] / GIB, 3)}


def _plan_architecture(config: dict[str, Any], arch: str, options: dict[str, Any], num_classes: int,
                       in_channels: int, measure_cuda: bool, budget: float, n_cases: int) -> dict[str, Any]:
    """`_architecture_entry` with option `checkpoint=auto` resolved: gradient checkpointing is turned
    on only when, without it, the architecture's patch would be smaller than the U-Net's (and it helps)."""
    def entry(opts: dict[str, Any]) -> dict[str, Any]:
        fn = make_memory_fn(num_classes, in_channels, arch, measure_cuda, opts)
        return _architecture_entry(config, arch, opts, fn, budget, n_cases)

    if options.get("checkpoint") != "auto":
        return entry(options)
    plain = entry({**options, "checkpoint": "false"})
    vox = lambda e: float(np.prod(e["patch_size"], dtype=np.float64))  # noqa: E731
    if vox(plain) >= float(np.prod(config["patch_size"], dtype=np.float64)):
        return plain
    ckpt = entry({**options, "checkpoint": "true"})
    return ckpt if vox(ckpt) > vox(plain) or ckpt["batch_size"] > plain["batch_size"] else plain


def plan_from_fingerprint(
    fingerprint: dict[str, Any],
    *,
    gpu_memory_gb: float = 8.0,
    configs: Sequence[str] | None = None,
    arch: str = "unet",
    arch_options: dict[str, Any] | None = None,
    dataset_dir: str = "",
    measure_cuda: bool = False,
) -> Plans:
    """Plan every requested configuration (default: all that the rules call for) for a fingerprint.

    The configurations' own keys are nnU-Net's U-Net plan. `arch` becomes the default architecture;
    when it is not `unet`, each configuration also gets `architectures[arch]`: patch, batch and
    topology sized for that architecture's own memory, built with `arch_options` (defaults filled in).
    """
    wanted = list(configs) if configs else list(ALL_CONFIGS)
    unknown = [c for c in wanted if c not in ALL_CONFIGS]
    if unknown:
        raise ConfigError(f"unknown configuration(s) {unknown}; valid: {', '.join(ALL_CONFIGS)}")
    if not fingerprint.get("cases"):
        raise PlanError("the fingerprint holds no labelled case; add labelled training cases and rerun `medseg3d plan`")
    if any(len(s) != 3 for s in fingerprint["spacings"]):
        raise PlanError("medseg3d plans 3D volumes only; this dataset holds 2D images. Save each image as a "
                        "3D NIfTI with one slice (shape X x Y x 1) and rerun `medseg3d plan`")
    labels = {int(k): v for k, v in fingerprint["labels"].items()}
    num_classes = max(labels) + 1
    channels = list(fingerprint["channel_names"])
    n_cases = int(fingerprint["num_cases"])
    arch = str(arch).lower()
    memory_fn = make_memory_fn(num_classes, len(channels), "unet", measure_cuda)
    budget = gpu_memory_gb * GIB
    norm = rules.normalization_for(channels, fingerprint["foreground_intensity_properties_per_channel"],
                                   float(fingerprint.get("median_relative_size_after_cropping", 1.0)))

    full_sp = rules.target_spacing(fingerprint["spacings"], fingerprint["shapes_after_crop"])
    full_med = _median_shape_after_resampling(fingerprint, full_sp)
    n_vox = float(np.prod(full_med, dtype=np.float64)) * n_cases
    out: dict[str, dict[str, Any]] = {}
    is_3d = min(full_med) > 1
    fullres = None
    if is_3d:
        fullres = _configuration(3, full_sp, full_med, "3d_fullres", norm, memory_fn, budget, n_vox, arch, None,
                                 full_sp, full_med)
    slice_axis = rules.slice_axis_2d(full_sp, full_med)
    if "2d" in wanted or not is_3d:
        out["2d"] = _configuration(2, full_sp, full_med, "2d", norm, memory_fn, budget, n_vox, arch,
                                   slice_axis, full_sp, full_med)
    if fullres is not None:
        lowres = _plan_lowres(fullres, full_sp, full_med, norm, memory_fn, budget, n_cases, arch)
        if "3d_fullres" in wanted or "3d_cascade_fullres" in wanted:
            out["3d_fullres"] = fullres
        if lowres is not None and ("3d_lowres" in wanted or "3d_cascade_fullres" in wanted):
            lowres["next_stage"] = "3d_cascade_fullres"
            out["3d_lowres"] = lowres
            cascade = copy.deepcopy(fullres)
            cascade["previous_stage"] = "3d_lowres"
            out["3d_cascade_fullres"] = cascade
        elif lowres is None and configs and ("3d_lowres" in configs or "3d_cascade_fullres" in configs):
            log.info("3d_lowres/cascade not planned: the 3d_fullres patch already covers >= 25%% of the median image")
    if configs and "3d_fullres" in configs and fullres is None:
        log.info("3d_fullres not planned: the median image is thin (2D-like) %s", [int(v) for v in full_med])
    if arch != "unet":
        from medseg3d.networks import get_architecture

        options = get_architecture(arch).resolve_options(arch_options)
        for c in out.values():
            c["architectures"] = {arch: _plan_architecture(c, arch, options, num_classes, len(channels), measure_cuda,
                                                           budget, n_cases)}
    raw = {
        "schema_version": SCHEMA_VERSION,
        "medseg3d_version": __version__,
        "dataset_hash": dataset_hash(fingerprint),
        "dataset_name": fingerprint.get("dataset_name", ""),
        "dataset_dir": str(dataset_dir),
        "channel_names": channels,
        "labels": {str(k): v for k, v in sorted(labels.items())},
        "gpu_memory_gb": float(gpu_memory_gb),
        "original_median_spacing": [float(v) for v in np.median(np.asarray(fingerprint["spacings"]), axis=0)],
        "original_median_shape": [int(round(v)) for v in np.median(np.asarray(fingerprint["shapes_after_crop"]), axis=0)],
        "configurations": {k: out[k] for k in ALL_CONFIGS if k in out},
    }
    return Plans(raw)


def _plan_lowres(
    fullres: dict[str, Any], full_sp: list[float], full_med: list[float], norm: list[dict], memory_fn: Any,
    budget: float, n_cases: int, arch: str,
) -> dict[str, Any] | None:
    """nnU-Net's lowres search: coarsen the spacing in 3% steps until the patch covers >= 25% of the image."""
    if not rules.needs_lowres(fullres["patch_size"], full_med):
        return None
    sp = list(full_sp)
    plan = None
    med_vox = float(np.prod(full_med, dtype=np.float64))
    patch_vox = float(np.prod(fullres["patch_size"], dtype=np.float64))
    for _ in range(200):
        if patch_vox / med_vox >= rules.LOWRES_THRESHOLD:
            break
        sp = rules.next_lowres_spacing(sp)
        med = [f / s * m for f, s, m in zip(full_sp, sp, full_med)]
        med_vox = float(np.prod(med, dtype=np.float64))
        plan = _configuration(3, sp, med, "3d_lowres", norm, memory_fn, budget, med_vox * n_cases, arch, None, sp, med)
        patch_vox = float(np.prod(plan["patch_size"], dtype=np.float64))
    if plan is None or float(np.prod(full_med, dtype=np.float64)) / med_vox < 2:
        return None  # the lowres image would be less than 2x smaller: not worth a cascade
    return plan
