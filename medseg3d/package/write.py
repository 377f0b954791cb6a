"""Writing a model package (`medseg3d export`): plan, labels, postprocessing, safetensors weights, manifest.

Layout and checks: `medseg3d.package`."""

from __future__ import annotations

import json
import logging
import zipfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from medseg3d import __version__
from medseg3d.errors import (
    InputError,
    OutputExistsError,
)
from medseg3d.io.atomic import atomic_path
from medseg3d.package import (
    EXPORT_CHECKPOINTS,
    LABELS,
    MANIFEST,
    METADATA_KEYS,
    NETWORK_FORMATS,
    PACKAGE_FORMAT,
    PACKAGE_VERSION,
    PLANS,
    POSTPROCESSING,
    _json_bytes,
    _sha256,
    metadata_member,
    weights_member,
)
from medseg3d.paths import model_dir_of
from medseg3d.plans.schema import Plans

log = logging.getLogger(__name__)


def _checkpoint_metadata(ckpt: dict[str, Any], fold: int | str, checkpoint: str) -> dict[str, Any]:
    """The JSON-able metadata of a checkpoint (`METADATA_KEYS`), plus the fold and the checkpoint kind."""
    meta: dict[str, Any] = {}
    for key in METADATA_KEYS:
        if key not in ckpt:
            continue
        try:
            json.dumps(ckpt[key])
        except (TypeError, ValueError):
            log.warning("checkpoint key %r of fold %s is not plain data; left out of the package", key, fold)
            continue
        meta[key] = ckpt[key]
    meta["fold"] = fold
    meta["checkpoint"] = checkpoint
    return meta


def _safetensors_bytes(state_dict: dict[str, Any]) -> bytes:
    """A state_dict as safetensors bytes (each tensor copied contiguous on the CPU: no shared storage)."""
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}, metadata={"format": "pt"})


def write_package(
    work_dir: str | Path,
    output: str | Path,
    *,
    config: str = "3d_fullres",
    arch: str | None = None,
    folds: list[int | str] | None = None,
    checkpoint: str = "final",
    overwrite: bool = False,
    formats: list[str] | None = None,
) -> dict[str, Any]:

    """Write the model `WORK_DIR/results/<config>/<arch>` (the chosen folds' `checkpoint_<checkpoint>.pt`)
    as one zip at `output`, atomically (temp file + rename). Returns the manifest.

    `formats`: exported networks to add per fold (`NETWORK_FORMATS`: `onnx`, `openvino`), for
    `predict --backend onnxruntime|openvino`; the safetensors weights are always there.

    Every checkpoint is checked against plans.json first (`load_checkpoint`), as `predict` would.
    `OutputExistsError` when `output` exists and not `overwrite`.
    """
    from medseg3d.inference.folder import load_fold_checkpoint, select_folds
    from medseg3d.postprocess import load_postprocessing

    work_dir, output = Path(work_dir), Path(output)
    if checkpoint not in EXPORT_CHECKPOINTS:
        raise InputError(f"--checkpoint {checkpoint!r} cannot be exported; use one of {', '.join(EXPORT_CHECKPOINTS)}")
    if output.suffix != ".zip":
        raise InputError(f"-o {output}: a model package is a .zip file; name it e.g. {output.with_suffix('.zip').name}")
    if output.exists() and not overwrite:  # before any work (atomic_path checks again when renaming)
        raise OutputExistsError(f"{output} already exists; pass --overwrite to replace it")
    formats = list(dict.fromkeys(formats or []))
    unknown = [f for f in formats if f not in NETWORK_FORMATS]
    if unknown:
        raise InputError(f"--format {', '.join(unknown)} is not one of {', '.join(NETWORK_FORMATS)}")
    if "openvino" in formats:
        from medseg3d.inference.onnx_export import import_openvino

        import_openvino()  # not installed: refused before any work
    plans = Plans.load(work_dir)
    arch = arch or plans.configuration(config).architecture
    folds = select_folds(work_dir, config, arch, folds, checkpoint)
    identity = plans.network_identity(config, arch)
    members: dict[str, bytes] = {PLANS: (work_dir / PLANS).read_bytes(), LABELS: _json_bytes({
        "labels": plans.raw["labels"], "channel_names": plans.channel_names, "dataset_name": plans.dataset_name})}
    mdir = model_dir_of(work_dir, config, arch)
    postprocessing = load_postprocessing(mdir)
    if postprocessing is not None:
        members[POSTPROCESSING] = (mdir / POSTPROCESSING).read_bytes()
    for fold in folds:
        ckpt = load_fold_checkpoint(work_dir, config, arch, fold, checkpoint, identity, plans.file_hash)
        members[metadata_member(fold)] = _json_bytes(_checkpoint_metadata(ckpt, fold, checkpoint))
        members[weights_member(fold)] = _safetensors_bytes(ckpt["model"])
        if formats:
            from medseg3d.inference.checkpoint import build_model_from_checkpoint
            from medseg3d.inference.onnx_export import network_members

            patch = plans.configuration(config).for_architecture(arch).patch_size
            exported = network_members(build_model_from_checkpoint(ckpt), formats, int(ckpt["in_channels"]), patch,
                                       name=f"fold {fold}")
            members.update({f"fold_{fold}/{name}": data for name, data in exported.items()})
        del ckpt
    manifest = {
        "format": PACKAGE_FORMAT,
        "format_version": PACKAGE_VERSION,
        "medseg3d_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "configuration": config,
        "architecture": arch,
        "checkpoint": checkpoint,
        "folds": folds,
        "dataset_name": plans.dataset_name,
        "labels": plans.raw["labels"],
        "channel_names": plans.channel_names,
        "plan_hash": plans.network_hash(config, arch),
        "postprocessing": postprocessing is not None,
        "network_formats": formats,
        "members": {name: {"sha256": _sha256(data), "bytes": len(data)} for name, data in members.items()},
    }
    with atomic_path(output, overwrite=overwrite) as tmp, zipfile.ZipFile(tmp, "w") as zf:
        zf.writestr(MANIFEST, _json_bytes(manifest), compress_type=zipfile.ZIP_DEFLATED)
        for name, data in members.items():  # weights barely compress: stored, so reading them is a copy
            kind = zipfile.ZIP_STORED if name.endswith((".safetensors", ".onnx", ".bin")) else zipfile.ZIP_DEFLATED
            zf.writestr(name, data, compress_type=kind)
    log.info("exported %s/%s folds %s (checkpoint_%s) to %s", config, arch, folds, checkpoint, output)
    return manifest

