"""Model packages: one zip holding everything `predict` needs, with no pickle inside.

Layout (docs/inference.md, "Model packages"):

    medseg3d_package.json          manifest: format, format_version, medseg3d_version, created (UTC),
                                   configuration, architecture, checkpoint, folds, labels, channel_names,
                                   plan_hash, and `members`: name -> {sha256, bytes} of every other member
    plans.json                     the WORK_DIR's plans.json, byte for byte
    labels.json                    {"labels": {"0": "background", ...}, "channel_names": [...], "dataset_name"}
    postprocessing.json            only when the model folder has one
    fold_<K>/weights.safetensors   the fold's state_dict (safetensors: tensors only, no code)
    fold_<K>/checkpoint.json       the checkpoint's plain metadata (network_kwargs, plan_hash, plan_identity, ...)
    fold_<K>/network.onnx          only with `--format onnx`: the network as ONNX (dynamic batch, the plan's patch)
    fold_<K>/network.xml, .bin     only with `--format openvino`: the same network as OpenVINO IR (float32)

Reading checks, in this order: a readable zip, a manifest of this format, a known format version,
exactly the listed members, each member's sha256, then (per fold) the checkpoint checks of
`inference.checkpoint.check_checkpoint` against the packaged plan. The sha256 catches damage and
edits after export; it is not a signature (whoever can rewrite a member can rewrite the manifest),
but no member can run code: weights are safetensors and the rest is JSON.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from medseg3d import __version__
from medseg3d.errors import (
    CheckpointError,
    ConfigError,
    InputError,
    OutputExistsError,
    PackageError,
    PlanError,
)
from medseg3d.io.atomic import atomic_path
from medseg3d.paths import model_dir_of
from medseg3d.plans.schema import SCHEMA_VERSION, Plans

log = logging.getLogger(__name__)

PACKAGE_FORMAT = "medseg3d-model-package"
#: The package layout this medseg3d writes and reads.
PACKAGE_VERSION = 1
MANIFEST = "medseg3d_package.json"
PLANS = "plans.json"
LABELS = "labels.json"
POSTPROCESSING = "postprocessing.json"
#: Checkpoint kinds a package may hold (`latest` is a training artefact).
EXPORT_CHECKPOINTS = ("final", "best")
#: Checkpoint keys copied into `checkpoint.json` when present (plain data; never optimizer, rng or log).
METADATA_KEYS = ("format_version", "plan_hash", "plan_identity", "configuration", "architecture", "network_kwargs",
                 "in_channels", "num_classes", "fold", "patch_size", "epoch", "train_config")

_REEXPORT = "re-export it (`medseg3d export WORK_DIR -o FILE.zip`) or copy an intact one"


def weights_member(fold: int | str) -> str:
    """`fold_<K>/weights.safetensors`."""
    return f"fold_{fold}/weights.safetensors"


def metadata_member(fold: int | str) -> str:
    """`fold_<K>/checkpoint.json`."""
    return f"fold_{fold}/checkpoint.json"


#: `export --format` values and the per-fold members (`fold_<K>/NAME`) each adds; `inference.backends` runs them.
NETWORK_FORMATS = {"onnx": ("network.onnx",), "openvino": ("network.xml", "network.bin")}



def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode("utf-8")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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
            exported = network_members(build_model_from_checkpoint(ckpt), formats, plans.num_channels, patch,
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


def _read(zf: zipfile.ZipFile, path: Path, name: str) -> bytes:
    """Member `name`'s bytes; PackageError when the zip cannot give them (damaged: bad CRC, truncated)."""
    try:
        return zf.read(name)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, KeyError) as exc:
        raise PackageError(f"model package {path}: member {name} cannot be read ({type(exc).__name__}: {exc}); "
                           f"the file is damaged: {_REEXPORT}") from exc


def _parse_json(data: bytes, path: Path, name: str) -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PackageError(f"model package {path}: {name} is not readable JSON ({exc}); {_REEXPORT}") from exc


def _check_manifest(manifest: Any, path: Path) -> dict[str, Any]:
    """The manifest, after the checks of its format, version and keys."""
    if not isinstance(manifest, dict) or manifest.get("format") != PACKAGE_FORMAT:
        raise PackageError(f"{path} is not a medseg3d model package ({MANIFEST} does not say format "
                           f"{PACKAGE_FORMAT!r}); export one with `medseg3d export WORK_DIR -o FILE.zip`")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version != PACKAGE_VERSION:
        newer = isinstance(version, int) and version > PACKAGE_VERSION
        raise PackageError(
            f"model package {path} has format version {version!r}; this medseg3d ({__version__}) reads "
            f"{PACKAGE_VERSION}. " + ("It was written by a newer medseg3d: upgrade medseg3d, or re-export the model "
                                      "with this version" if newer else
                                      "Re-export the model with this medseg3d (`medseg3d export`)"))
    need = ("configuration", "architecture", "checkpoint", "folds", "members")
    missing = [k for k in need if k not in manifest]
    members_ok = isinstance(manifest.get("members"), dict) and all(
        isinstance(v, dict) and isinstance(v.get("sha256"), str) and isinstance(v.get("bytes"), int)
        for v in manifest["members"].values())
    if missing or not members_ok or not isinstance(manifest["folds"], list):
        raise PackageError(f"model package {path}: {MANIFEST} lacks or garbles {', '.join(missing) or 'members/folds'}; "
                           f"{_REEXPORT}")
    return manifest


@dataclass
class ModelPackage:
    """A verified model package: its manifest, plan, labels and postprocessing; weights read on demand.

    `open_package` builds it after checking every member's sha256, so a damaged or altered package
    is refused before any work.
    """

    path: Path
    manifest: dict[str, Any]
    plans: Plans
    labels: dict[str, Any]
    postprocessing: dict | None
    metadata: dict[str, dict[str, Any]]  # fold (as str) -> checkpoint.json

    @property
    def configuration(self) -> str:
        return str(self.manifest["configuration"])

    @property
    def architecture(self) -> str:
        return str(self.manifest["architecture"])

    @property
    def checkpoint(self) -> str:
        return str(self.manifest["checkpoint"])

    @property
    def folds(self) -> list[int | str]:
        return list(self.manifest["folds"])

    def check_selection(self, config: str | None, arch: str | None, checkpoint: str | None = None) -> None:
        """ConfigError when `config`/`arch` (None: the package's) are not what the package holds;
        a `checkpoint` other than the package's is only logged (a package holds one set of weights)."""
        if config is not None and config != self.configuration:
            raise ConfigError(f"model package {self.path} holds configuration {self.configuration!r} only, not "
                              f"{config!r}; pass --config {self.configuration} (or export {config} into its own package)")
        if arch is not None and arch != self.architecture:
            raise ConfigError(f"model package {self.path} holds architecture {self.architecture!r} only, not "
                              f"{arch!r}; pass --arch {self.architecture} or leave --arch out")
        if checkpoint is not None and checkpoint != self.checkpoint:
            log.info("model package %s holds checkpoint_%s weights; --checkpoint %s applies to a WORK_DIR only",
                     self.path, self.checkpoint, checkpoint)

    def select_folds(self, folds: list[int | str] | None) -> list[int | str]:
        """`folds` (None: every fold of the package); CheckpointError listing the package's folds otherwise."""
        if folds is None:
            return self.folds
        missing = [f for f in folds if f not in self.folds]
        if missing:
            raise CheckpointError(
                f"model package {self.path} has no fold {', '.join(str(f) for f in missing)}; it holds folds "
                f"{', '.join(str(f) for f in self.folds)}. Pass --folds with those, or export the missing folds")
        return list(folds)

    def load_checkpoint(self, fold: int | str) -> dict[str, Any]:
        """Fold `fold` as a checkpoint dict (`checkpoint.json` + `model` state_dict from safetensors),
        checked against the packaged plan like a `.pt` checkpoint (`check_checkpoint`)."""
        from safetensors import SafetensorError
        from safetensors.torch import load

        from medseg3d.inference.checkpoint import check_checkpoint

        name = weights_member(fold)
        with _open_zip(self.path) as zf:
            data = _read(zf, self.path, name)
        _check_hash(self.manifest, self.path, name, data)
        try:
            state = load(data)
        except (SafetensorError, ValueError) as exc:
            raise PackageError(f"model package {self.path}: {name} is not a readable safetensors file ({exc}); "
                               f"{_REEXPORT}") from exc
        ckpt = {**self.metadata[str(fold)], "model": state}
        fix = f"re-export the package (`medseg3d export WORK_DIR -o {self.path.name}`)"
        return check_checkpoint(ckpt, f"{self.path}:{name}", legacy_hash=self.plans.file_hash, fix=fix,
                                expected_plan=self.plans.network_identity(self.configuration, self.architecture))

    def network_members(self, fold: int | str) -> dict[str, bytes]:
        """Fold `fold`'s exported networks (`network.onnx`, `network.xml`, `network.bin`: those present),
        each checked against the manifest's sha256."""
        out = {}
        with _open_zip(self.path) as zf:
            for name in (n for names in NETWORK_FORMATS.values() for n in names):
                member = f"fold_{fold}/{name}"
                if member in self.manifest["members"]:
                    data = _read(zf, self.path, member)
                    _check_hash(self.manifest, self.path, member, data)
                    out[name] = data
        return out

    def load_models(self, folds: list[int | str] | None = None) -> list[Any]:
        """One eval-mode network (`nn.Module`, CPU) per fold of `select_folds(folds)`."""
        from medseg3d.inference.checkpoint import build_model_from_checkpoint

        chosen = self.select_folds(folds)
        models = [build_model_from_checkpoint(self.load_checkpoint(f)) for f in chosen]
        log.info("loaded %d fold model(s) %s from package %s (%s/%s, checkpoint_%s)", len(models), chosen, self.path,
                 self.configuration, self.architecture, self.checkpoint)
        return models

    def write_work_dir(self, root: Path) -> Path:
        """Lay out `root` as the WORK_DIR `predict_folder` reads (plans.json, the model folder's
        postprocessing.json); weights are not written, they are passed as models. Returns `root`."""
        root.mkdir(parents=True, exist_ok=True)
        (root / PLANS).write_text(json.dumps(self.plans.raw), encoding="utf-8")
        if self.postprocessing is not None:
            mdir = model_dir_of(root, self.configuration, self.architecture)
            mdir.mkdir(parents=True, exist_ok=True)
            (mdir / POSTPROCESSING).write_text(json.dumps(self.postprocessing), encoding="utf-8")
        return root


def _open_zip(path: Path) -> zipfile.ZipFile:
    """`path` opened as a zip; PackageError when it is missing, not a zip or damaged."""
    if not path.is_file():
        raise InputError(f"model package {path} does not exist (give a .zip from `medseg3d export` or a WORK_DIR)")
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as exc:
        raise PackageError(f"{path} is not a readable zip file ({type(exc).__name__}: {exc}): the model package is "
                           f"damaged or truncated, or not a package at all; {_REEXPORT}") from exc


def _check_hash(manifest: dict[str, Any], path: Path, name: str, data: bytes) -> None:
    expected = manifest["members"].get(name, {}).get("sha256")
    actual = _sha256(data)
    if actual != expected:
        raise PackageError(
            f"model package {path}: member {name} has sha256 {actual[:16]}..., the manifest records "
            f"{str(expected)[:16]}...: it was altered or damaged after export. Do not use it; {_REEXPORT}")


def open_package(path: str | Path) -> ModelPackage:
    """Open and verify a model package (every member against the manifest's sha256; weights are
    hashed here and again when loaded). PackageError names the file, what is wrong and the fix."""
    path = Path(path)
    with _open_zip(path) as zf:
        names = zf.namelist()
        if MANIFEST not in names:
            raise PackageError(f"{path} holds no {MANIFEST}: it is not a medseg3d model package (a zip from "
                               "elsewhere?); export one with `medseg3d export WORK_DIR -o FILE.zip`")
        manifest = _check_manifest(_parse_json(_read(zf, path, MANIFEST), path, MANIFEST), path)
        listed, present = set(manifest["members"]), set(names) - {MANIFEST}
        if listed != present or len(names) != len(set(names)):
            what = []
            if listed - present:
                what.append("missing " + ", ".join(sorted(listed - present)))
            if present - listed:
                what.append("unlisted " + ", ".join(sorted(present - listed)))
            if len(names) != len(set(names)):
                what.append("duplicate member names")
            raise PackageError(f"model package {path} does not hold what its manifest lists ({'; '.join(what)}): "
                               f"it was altered after export; {_REEXPORT}")
        contents = {}
        for name in sorted(listed):
            size = zf.getinfo(name).file_size
            if size != manifest["members"][name]["bytes"]:  # checked before reading: no surprise decompression
                raise PackageError(f"model package {path}: member {name} is {size} bytes, the manifest records "
                                   f"{manifest['members'][name]['bytes']}: it was altered after export; {_REEXPORT}")
            data = _read(zf, path, name)
            _check_hash(manifest, path, name, data)
            if not name.endswith((".safetensors", ".onnx", ".bin")):
                contents[name] = data
            del data
    needed = [PLANS, *(metadata_member(f) for f in manifest["folds"]), *(weights_member(f) for f in manifest["folds"])]
    absent = [n for n in needed if n not in listed]
    if absent:
        raise PackageError(f"model package {path} lacks {', '.join(absent)}; {_REEXPORT}")
    raw = _parse_json(contents[PLANS], path, PLANS)
    version = raw.get("schema_version") if isinstance(raw, dict) else None
    if version != SCHEMA_VERSION:
        raise PackageError(f"model package {path}: {PLANS} has schema_version {version!r}, this medseg3d reads "
                           f"{SCHEMA_VERSION}; use the medseg3d version that exported it, or re-export the model")
    try:
        plans = Plans(raw)
    except (PlanError, TypeError, AttributeError, KeyError, ValueError) as exc:
        raise PackageError(f"model package {path}: {PLANS} is not a medseg3d plan ({exc}); {_REEXPORT}") from exc
    labels = _parse_json(contents[LABELS], path, LABELS) if LABELS in contents else {"labels": plans.raw["labels"]}
    post = _postprocessing(contents[POSTPROCESSING], path) if POSTPROCESSING in contents else None
    metadata = {str(f): _parse_json(contents[metadata_member(f)], path, metadata_member(f)) for f in manifest["folds"]}
    return ModelPackage(path, manifest, plans, labels, post, metadata)


def _postprocessing(data: bytes, path: Path) -> dict | None:
    """The packaged postprocessing decision, checked by the reader `predict` uses on a model folder."""
    from medseg3d.postprocess import POSTPROCESSING_FILE, load_postprocessing

    with tempfile.TemporaryDirectory(prefix="medseg3d_package_") as tmp:
        (Path(tmp) / POSTPROCESSING_FILE).write_bytes(data)
        try:
            return load_postprocessing(tmp)
        except InputError as exc:
            raise PackageError(f"model package {path}: {POSTPROCESSING} is not a postprocessing decision "
                               f"({exc}); {_REEXPORT}") from exc


def is_package(path: str | Path) -> bool:
    """True when `path` names a package (a `.zip`, or any file: `open_package` refuses a non-package);
    a WORK_DIR is a folder."""
    path = Path(path)
    return path.suffix.lower() == ".zip" or path.is_file()


def predict_package(
    package: str | Path,
    input_path: str | Path,
    output_dir: str | Path,
    *,
    config: str | None = None,
    arch: str | None = None,
    folds: list[int | str] | None = None,
    checkpoint: str | None = None,
    **kwargs: Any,
) -> Any:
    """`predict_folder` with the networks, plan and postprocessing of a model package (no WORK_DIR).

    The plan and postprocessing are laid out in a temporary WORK_DIR and the fold networks passed
    in, so the output is bit-for-bit that of `predict -m WORK_DIR`. Returns `PredictSummary`.
    """
    from medseg3d.inference.backends import to_backend
    from medseg3d.inference.folder import predict_folder

    pkg = open_package(package)
    pkg.check_selection(config, arch, checkpoint)
    backend = _package_backend(pkg, folds, kwargs)
    models = to_backend(pkg.load_models(folds), backend, in_channels=pkg.plans.num_channels,
                        patch_size=pkg.plans.configuration(pkg.configuration).for_architecture(pkg.architecture).patch_size,
                        folds=pkg.select_folds(folds), exported=pkg.network_members, source=str(pkg.path))
    with tempfile.TemporaryDirectory(prefix="medseg3d_package_") as tmp:
        work_dir = pkg.write_work_dir(Path(tmp))
        return predict_folder(work_dir, input_path, output_dir, config=pkg.configuration, arch=pkg.architecture,
                              models=models, **{**kwargs, "backend": backend})


def _package_backend(pkg: ModelPackage, folds: list[int | str] | None, kwargs: dict[str, Any]) -> str:
    """The backend `predict_package` runs (`kwargs`: predict_folder's backend, device, precision):
    `auto` keeps torch when a fold lacks the exported network the backend it would pick runs."""
    from medseg3d.device import resolve_device
    from medseg3d.inference.backends import resolve_backend
    from medseg3d.inference.predictor import resolve_amp

    requested = kwargs.get("backend", "auto")
    dev = resolve_device(kwargs.get("device", "auto"))
    backend = resolve_backend(requested, dev, resolve_amp(kwargs.get("precision", "auto"), dev))
    if requested == "auto" and backend != "torch":
        runs = ("network.onnx",) if backend == "onnxruntime" else ("network.onnx", "network.xml")
        if not all(any(f"fold_{f}/{n}" in pkg.manifest["members"] for n in runs) for f in pkg.select_folds(folds)):
            log.info("model package %s holds no exported network; --backend auto runs torch", pkg.path)
            return "torch"
    return backend
