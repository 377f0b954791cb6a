"""The 3d_lowres -> 3d_cascade_fullres cascade: the previous stage's segmentation as extra input channels.

A configuration with `previous_stage` (nnU-Net's `3d_cascade_fullres`, `previous_stage` =
`3d_lowres`) is the 3d_fullres network with K - 1 more input channels: the one-hot foreground
classes of the lowres stage's segmentation, on the fullres grid.

Training (`medseg3d train --config 3d_cascade_fullres --fold k`) needs the same architecture's
3d_lowres fold k (`checkpoint_final.pt`). Its segmentations of every case of the fold (its
validation cases, which it never trained on, and its training cases) are computed once from the
lowres cache (sliding window, mirror TTA, on the lowres grid), resampled to the fullres grid
(linear one-hot) and cached in `WORK_DIR/preprocessed/<fullres id>_prev_<lowres>_<arch>_fold<k>/`
with a `stage.json` naming the lowres checkpoint (its sha256): a retrained lowres fold rebuilds
them. The patches carry them as a second label channel through the spatial augmentation (nearest,
like the label), then `cascade_augment` applies nnU-Net's cascade augmentation to the one-hot
channels: per sample with p 0.4 a random binary dilation, erosion, opening or closing (radius 1-8
voxels, per class), with p 0.2 the removal of one random connected component of a class (components
covering more than 15% of the patch are kept).

Prediction (`predict --config 3d_cascade_fullres`, and the cascade's final validation) runs the
lowres stage first on the same image (or takes `--previous-stage DIR` segmentations in the
original geometry), then preprocesses that segmentation exactly like a label (crop, linear one-hot
resampling to the fullres grid) and appends it one-hot to the image channels.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from medseg3d.errors import ConfigError

log = logging.getLogger(__name__)

#: nnU-Net's cascade augmentation: probabilities per sample, structuring radius, component cap.
P_BINARY_OP = 0.4
STREL_RADIUS = (1, 8)
P_REMOVE_COMPONENT = 0.2
MAX_COMPONENT_FRACTION = 0.15


def previous_stage_of(plans: Any, config_name: str) -> str | None:
    """The configuration whose segmentation `config_name` takes as input, or None."""
    return plans.configuration(config_name).previous_stage


def extra_channels(plans: Any, config_name: str) -> int:
    """Input channels a configuration adds to the image's: K - 1 for a cascade stage, else 0."""
    return plans.num_classes - 1 if previous_stage_of(plans, config_name) else 0


def require_previous_fold(work_dir: Path, plans: Any, config_name: str, arch: str, fold: int | str) -> Path:
    """The previous stage's fold folder with `checkpoint_final.pt`; ConfigError saying what to train otherwise."""
    from medseg3d.paths import fold_dir_of

    prev = previous_stage_of(plans, config_name)
    if prev is None:
        raise ValueError(f"{config_name} has no previous stage")
    fdir = fold_dir_of(work_dir, prev, arch, fold)
    if not (fdir / "checkpoint_final.pt").is_file():
        raise ConfigError(
            f"{config_name} fold {fold} takes the segmentations of {prev} fold {fold} ({arch}) as input, and "
            f"{fdir / 'checkpoint_final.pt'} does not exist; train it first: "
            f"`medseg3d train {work_dir} --config {prev} --arch {arch} --fold {fold}`")
    return fdir


def previous_cache_dir(work_dir: Path, plans: Any, config_name: str, arch: str, fold: int | str) -> Path:
    cfg = plans.configuration(config_name)
    return Path(work_dir) / "preprocessed" / f"{cfg.data_identifier}_prev_{cfg.previous_stage}_{arch}_fold{fold}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def prepare_previous_stage(work_dir: Path, plans: Any, config_name: str, arch: str, fold: int | str,
                           cases: Sequence[str], device: torch.device, step: float = 0.5,
                           mirroring: bool = True, write: bool = True) -> Path:
    """Cache the previous stage's segmentation of every case on this configuration's grid; returns the folder.

    `CASE.npy`: uint8 `(X, Y, Z)` labels of the fullres cache's grid. Cases already cached by the same
    lowres checkpoint are kept; everything is rebuilt when that checkpoint changed. `write=False`
    (DDP ranks other than 0) only returns the folder rank 0 fills.
    """
    if not write:
        return previous_cache_dir(work_dir, plans, config_name, arch, fold)
    from medseg3d.inference.checkpoint import build_model_from_checkpoint, load_checkpoint
    from medseg3d.inference.predictor import resolve_amp
    from medseg3d.inference.sliding_window import sliding_window_predict
    from medseg3d.io.atomic import write_json_atomic
    from medseg3d.preprocess.cache import load_case
    from medseg3d.preprocess.resample import resample_seg

    fdir = require_previous_fold(work_dir, plans, config_name, arch, fold)
    prev_name = previous_stage_of(plans, config_name)
    ckpt_path = fdir / "checkpoint_final.pt"
    stamp = {"previous_stage": prev_name, "architecture": arch, "fold": str(fold), "checkpoint": str(ckpt_path),
             "sha256": _sha256(ckpt_path), "step": step, "mirroring": mirroring}
    out = previous_cache_dir(work_dir, plans, config_name, arch, fold)
    manifest = out / "stage.json"
    if manifest.is_file() and json.loads(manifest.read_text()) != stamp:
        log.info("the %s checkpoint changed since %s was cached: rebuilding it", prev_name, out)
        for f in out.glob("*.npy"):
            f.unlink()
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(manifest, stamp)
    todo = [c for c in cases if not (out / f"{c}.npy").is_file()]
    if not todo:
        return out
    prev_cfg = plans.configuration(prev_name).for_architecture(arch)
    cfg = plans.configuration(config_name)
    ckpt = load_checkpoint(ckpt_path, expected_plan=plans.network_identity(prev_name, arch),
                           legacy_hash=plans.file_hash)
    net = build_model_from_checkpoint(ckpt).to(device).eval()
    del ckpt
    amp = resolve_amp("auto", device)
    log.info("%s fold %s: segmenting %d case(s) with %s fold %s for the cascade's input", config_name, fold,
             len(todo), prev_name, fold)
    for case in todo:
        data, _, props = load_case(work_dir, prev_cfg.data_identifier, case, mmap=True)
        _, _, full_props = load_case(work_dir, cfg.data_identifier, case, mmap=True)
        if props["bbox"] != full_props["bbox"]:
            raise ConfigError(f"case {case}: the {prev_name} and {config_name} caches were cropped differently; "
                              "rerun `medseg3d plan` to rebuild both")
        with torch.no_grad():
            probs = sliding_window_predict([net], torch.from_numpy(np.asarray(data, dtype=np.float32)),
                                           patch_size=prev_cfg.patch_size, step=step,
                                           mirror_axes=prev_cfg.mirror_axes if mirroring else (), device=device,
                                           amp_dtype=amp)
        seg = probs.argmax(0).numpy().astype(np.uint8)
        seg = resample_seg(seg, full_props["shape_after_resample"], mode="linear_onehot")
        tmp = out / f".{case}.tmp.npy"
        np.save(tmp, seg.astype(np.uint8))
        tmp.replace(out / f"{case}.npy")
    return out


def one_hot_foreground(seg: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Integer labels `(B, *S)` -> float32 `(B, K - 1, *S)`: one channel per foreground class 1..K-1."""
    classes = torch.arange(1, num_classes, device=seg.device).reshape(1, -1, *([1] * (seg.dim() - 1)))
    return (seg.unsqueeze(1) == classes).to(torch.float32)


def _ball(dims: int) -> np.ndarray:
    return ndimage.generate_binary_structure(dims, 1)


def cascade_augment(onehot: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """nnU-Net's cascade augmentation of `(B, K - 1, *S)` one-hot previous-stage channels (see module doc).

    A binary operation of radius r is r iterations of the 6- (4-) connected elementary one: a
    diamond of radius r instead of a ball, at a fraction of the cost of a radius-8 ball in 3D.
    """
    arr = onehot.numpy().astype(bool)
    dims = arr.ndim - 2
    strel = _ball(dims)
    for b in range(arr.shape[0]):
        if rng.random() < P_BINARY_OP:
            for c in range(arr.shape[1]):
                r = int(rng.integers(STREL_RADIUS[0], STREL_RADIUS[1] + 1))
                op = ("dilation", "erosion", "opening", "closing")[int(rng.integers(4))]
                m = arr[b, c]
                if op == "dilation":
                    m = ndimage.binary_dilation(m, strel, iterations=r)
                elif op == "erosion":
                    m = ndimage.binary_erosion(m, strel, iterations=r)
                elif op == "opening":
                    m = ndimage.binary_opening(m, strel, iterations=r)
                else:
                    m = ndimage.binary_closing(m, strel, iterations=r)
                arr[b, c] = m
        if rng.random() < P_REMOVE_COMPONENT:
            c = int(rng.integers(arr.shape[1]))
            lab, n = ndimage.label(arr[b, c])
            if n:
                sizes = np.bincount(lab.ravel())[1:]
                small = [i + 1 for i, s in enumerate(sizes) if s <= MAX_COMPONENT_FRACTION * lab.size]
                if small:
                    arr[b, c][lab == small[int(rng.integers(len(small)))]] = False
    # a voxel claimed by two classes after dilations keeps both channels on, as in nnU-Net's transforms
    return torch.from_numpy(arr.astype(np.float32))
