"""Reading and verifying a model package: the manifest, every member's sha256, the plan, the folds.

Layout and checks: `medseg3d.package`."""

from __future__ import annotations

import json
import logging
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medseg3d import __version__
from medseg3d.errors import (
    CheckpointError,
    ConfigError,
    InputError,
    PackageError,
    PlanError,
)
from medseg3d.package import (
    _REEXPORT,
    LABELS,
    MANIFEST,
    NETWORK_FORMATS,
    PACKAGE_FORMAT,
    PACKAGE_VERSION,
    PLANS,
    POSTPROCESSING,
    _sha256,
    metadata_member,
    weights_member,
)
from medseg3d.paths import model_dir_of
from medseg3d.plans.schema import SCHEMA_VERSION, Plans

log = logging.getLogger(__name__)


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

