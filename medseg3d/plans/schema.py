"""The versioned `plans.json`: what the planner decided, with typed access for every later stage.

Every per-axis list (`spacing`, `patch_size`, `strides`, `kernel_sizes`, `median_shape`) is in the
voxel index order of the NIfTI files as nibabel reads them (array axes `(X, Y, Z)`); spacing in mm.
See docs/architecture.md for the table of configuration keys.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medseg3d.errors import ConfigError, PlanError
from medseg3d.io.atomic import write_json_atomic

#: Current schema version; `Plans.load` refuses anything else.
SCHEMA_VERSION = 1

_RERUN = "rerun `medseg3d plan DATA_DIR -o WORK_DIR` to write a fresh plans.json"

#: Keys every configuration must carry (schema version 1).
CONFIG_KEYS = (
    "dims", "spacing", "slice_axis", "data_identifier", "patch_size", "batch_size", "strides",
    "kernel_sizes", "features", "normalization", "architecture", "mirror_axes", "median_shape",
    "resampling", "previous_stage", "next_stage",
)

#: The configuration keys a trained network depends on: what its input looks like (spacing,
#: normalisation and its statistics, resampling, the previous stage's channels), the topology and
#: the patch its sliding window uses. The plan hash covers these, the labels and the channels; not
#: the dataset's path, the medseg3d version, the GPU budget, the batch size or the default
#: architecture name (a checkpoint records the architecture it was built with).
NETWORK_KEYS = (
    "dims", "spacing", "slice_axis", "patch_size", "strides", "kernel_sizes", "features", "normalization",
    "mirror_axes", "resampling", "previous_stage",
)


@dataclass
class ConfigurationPlan:
    """One configuration (`2d`, `3d_fullres`, `3d_lowres`, `3d_cascade_fullres`) of a plan.

    Wraps the JSON dict; every key of the architecture table has a typed property.
    """

    name: str
    raw: dict[str, Any]

    def __post_init__(self) -> None:
        missing = [k for k in CONFIG_KEYS if k not in self.raw]
        if missing:
            raise PlanError(f"configuration {self.name!r} in plans.json lacks keys {missing}; {_RERUN}")

    @property
    def dims(self) -> int:
        """2 or 3: the dimensionality of the network and the patch."""
        return int(self.raw["dims"])

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Target spacing (mm) of the preprocessed data, one value per array axis `(X, Y, Z)`."""
        return tuple(float(s) for s in self.raw["spacing"])  # type: ignore[return-value]

    @property
    def slice_axis(self) -> int | None:
        """2d only: the array axis (0..2) that is sliced; `None` for 3D configurations."""
        v = self.raw["slice_axis"]
        return None if v is None else int(v)

    @property
    def in_plane_axes(self) -> tuple[int, ...]:
        """Spatial array axes the patch spans: all three for 3D, the two others than `slice_axis` for 2d."""
        if self.slice_axis is None:
            return (0, 1, 2)
        return tuple(a for a in range(3) if a != self.slice_axis)

    @property
    def data_identifier(self) -> str:
        """Folder under `WORK_DIR/preprocessed/` holding the cases of this configuration."""
        return str(self.raw["data_identifier"])

    @property
    def patch_size(self) -> tuple[int, ...]:
        """Training patch, `dims` ints in voxels."""
        return tuple(int(p) for p in self.raw["patch_size"])

    @property
    def batch_size(self) -> int:
        return int(self.raw["batch_size"])

    @property
    def strides(self) -> list[list[int]]:
        """Per stage, the downsampling stride per patch axis (first stage all 1)."""
        return [[int(v) for v in s] for s in self.raw["strides"]]

    @property
    def kernel_sizes(self) -> list[list[int]]:
        """Per stage, the convolution kernel size per patch axis."""
        return [[int(v) for v in s] for s in self.raw["kernel_sizes"]]

    @property
    def features(self) -> list[int]:
        """Feature channels per stage."""
        return [int(f) for f in self.raw["features"]]

    @property
    def num_stages(self) -> int:
        return len(self.raw["strides"])

    @property
    def pools_per_axis(self) -> tuple[int, ...]:
        """Number of stride-2 downsamplings per patch axis."""
        return tuple(sum(1 for s in self.strides if s[a] == 2) for a in range(self.dims))

    @property
    def normalization(self) -> list[dict[str, Any]]:
        """Per channel `{"scheme": "zscore"|"ct"|"none"|"rescale", "use_mask", "mean", "std", "lower", "upper"}`."""
        return [dict(n) for n in self.raw["normalization"]]

    @property
    def architecture(self) -> str:
        """The default architecture (`medseg3d plan --arch`), used when `train`/`predict` name none."""
        return str(self.raw["architecture"])

    @property
    def architecture_options(self) -> dict[str, Any]:
        """The options this view's architecture is built with (defaults filled in by the registry)."""
        return dict(self.raw.get("architecture_options") or {})

    @property
    def planned_architectures(self) -> list[str]:
        """Architectures with a patch, batch and topology sized for their own memory (`plan --arch`)."""
        return sorted(self.raw.get("architectures") or {})

    def for_architecture(self, arch: str | None) -> ConfigurationPlan:
        """This configuration as architecture `arch` sees it (None: the default architecture).

        The U-Net keys (`patch_size`, `batch_size`, `strides`, `kernel_sizes`, `features`) are
        nnU-Net's plan; an architecture planned with `medseg3d plan --arch NAME` has its own entry
        under `architectures`, sized for its memory, which replaces them here, with its `options`
        as `architecture_options`. An architecture never planned uses the U-Net keys and its
        default options. A `time_budget` entry measured for `arch` then replaces features, patch
        and batch with its choice.
        """
        name = str(arch or self.architecture).lower()
        raw = {k: copy.deepcopy(v) for k, v in self.raw.items() if k != "architectures"}
        entry = copy.deepcopy((self.raw.get("architectures") or {}).get(name) or {})
        options = entry.pop("options", None) or {}
        raw.update(entry)
        budget = raw.get("time_budget")
        if budget and budget.get("architecture") == name:  # `plan --time-budget` chose this network
            choice = budget["choice"]
            raw.update({"features": list(choice["features"]), "patch_size": list(choice["patch_size"]),
                        "batch_size": int(choice["batch_size"])})
        raw["architecture"] = name
        raw["architecture_options"] = options
        return ConfigurationPlan(self.name, raw)

    @property
    def time_budget(self) -> dict[str, Any] | None:
        """The `medseg3d plan --time-budget` entry (budget, device, measured widths, choice, reason), or None.

        Its `choice` (features, patch, batch) replaces the nnU-Net keys in `for_architecture` of the
        architecture it was measured for, so the network trained, checked and rebuilt is the chosen one.
        """
        entry = self.raw.get("time_budget")
        return copy.deepcopy(entry) if entry else None

    @property
    def mirror_axes(self) -> tuple[int, ...]:
        """Patch axes (0-based) that mirroring may flip."""
        return tuple(int(a) for a in self.raw["mirror_axes"])

    @property
    def median_shape(self) -> tuple[int, ...]:
        """Median image shape (voxels, 3 values `(X, Y, Z)`) after cropping and resampling."""
        return tuple(int(s) for s in self.raw["median_shape"])

    @property
    def resampling(self) -> dict[str, Any]:
        """`{"image_order": 3, "label_mode": "linear_onehot"|"nearest", "separate_axis": int | None}`."""
        return dict(self.raw["resampling"])

    @property
    def native_spacing_axis(self) -> int | None:
        """The axis that keeps each case's own spacing (2d: the slice axis, as nnU-Net), or None."""
        v = self.raw["resampling"].get("native_axis")
        return None if v is None else int(v)

    def target_spacing(self, original_spacing: tuple[float, ...] | list[float]) -> tuple[float, float, float]:
        """Spacing (mm, `(X, Y, Z)`) a case of `original_spacing` is resampled to: the plan's `spacing`,
        except along `native_spacing_axis`, where the case keeps its own (2d never resamples through-plane)."""
        target = list(self.spacing)
        axis = self.native_spacing_axis
        if axis is not None:
            target[axis] = float(original_spacing[axis])
        return tuple(target)  # type: ignore[return-value]

    @property
    def previous_stage(self) -> str | None:
        return self.raw["previous_stage"]

    @property
    def next_stage(self) -> str | None:
        return self.raw["next_stage"]

    def network_kwargs(self) -> dict[str, Any]:
        """Plain arguments for `medseg3d.networks.build_network`: dims, strides, kernel_sizes,
        features, patch_size and this view's architecture `options` (see `for_architecture`)."""
        return {
            "dims": self.dims,
            "strides": self.strides,
            "kernel_sizes": self.kernel_sizes,
            "features": self.features,
            "patch_size": list(self.patch_size),
            "options": self.architecture_options,
        }


@dataclass
class Plans:
    """The whole plan: dataset facts plus one `ConfigurationPlan` per configuration name."""

    raw: dict[str, Any]
    configurations: dict[str, ConfigurationPlan] = field(init=False)

    def __post_init__(self) -> None:
        for key in ("schema_version", "dataset_hash", "labels", "channel_names", "configurations"):
            if key not in self.raw:
                raise PlanError(f"plans.json lacks the key {key!r}; {_RERUN}")
        self.configurations = {n: ConfigurationPlan(n, c) for n, c in self.raw["configurations"].items()}

    # ---- loading and saving ------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> Plans:
        """Read and check `plans.json` (a file, or a WORK_DIR holding one).

        Raises PlanError when it is missing, not JSON, or of an unknown/newer `schema_version`.
        """
        p = Path(path)
        if p.is_dir():
            p = p / "plans.json"
        if not p.is_file():
            raise PlanError(f"no plans file at {p}; {_RERUN}")
        try:
            raw = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PlanError(f"{p} is not readable JSON ({exc}); {_RERUN}") from exc
        if not isinstance(raw, dict):
            raise PlanError(f"{p} does not hold a JSON object; {_RERUN}")
        version = raw.get("schema_version")
        if not isinstance(version, int):
            raise PlanError(f"{p} has no integer schema_version (written by another tool?); {_RERUN}")
        if version > SCHEMA_VERSION:
            raise PlanError(
                f"{p} has schema_version {version}, newer than this medseg3d understands ({SCHEMA_VERSION}); "
                f"upgrade medseg3d or {_RERUN}"
            )
        if version != SCHEMA_VERSION:
            raise PlanError(f"{p} has unknown schema_version {version} (expected {SCHEMA_VERSION}); {_RERUN}")
        return cls(raw)

    def save(self, path: str | Path) -> None:
        """Write atomically as indented JSON."""
        write_json_atomic(Path(path), self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self.raw)

    # ---- typed access ----------------------------------------------------------------------
    def configuration(self, name: str) -> ConfigurationPlan:
        """The named configuration; ConfigError listing the valid names otherwise."""
        if name not in self.configurations:
            valid = ", ".join(self.configurations) or "(none)"
            raise ConfigError(f"configuration {name!r} is not in this plan; valid: {valid}")
        return self.configurations[name]

    @property
    def file_hash(self) -> str:
        """sha256 of the whole plan as canonical JSON: the plan hash medseg3d 0.1 checkpoints recorded
        (before `network_hash`); accepted for them as long as plans.json has not changed since."""
        canon = json.dumps(self.raw, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canon.encode("utf-8")).hexdigest()

    def network_identity(self, name: str, arch: str | None = None) -> dict[str, Any]:
        """What a network of architecture `arch` (default: the plan's) trained on configuration
        `name` depends on (`NETWORK_KEYS` of `for_architecture(arch)`, labels, channels).

        The architecture and its options are not part of it: the checkpoint records those itself.
        Checkpoints store it beside `network_hash`, so a refused checkpoint can say what differs.
        """
        raw = self.configuration(name).for_architecture(arch).raw
        return copy.deepcopy({
            "labels": self.raw["labels"], "channel_names": self.raw["channel_names"],
            "configuration": {k: raw.get(k) for k in NETWORK_KEYS},
        })

    def network_hash(self, name: str, arch: str | None = None) -> str:
        """sha256 of `network_identity(name)` as canonical JSON: the plan hash checkpoints record.

        Re-planning the same data (from another folder, with another medseg3d version or GPU
        budget, or adding another configuration) keeps it; a change a network depends on does not.
        """
        return identity_hash(self.network_identity(name, arch))

    @property
    def schema_version(self) -> int:
        return int(self.raw["schema_version"])

    @property
    def dataset_hash(self) -> str:
        return str(self.raw["dataset_hash"])

    @property
    def dataset_name(self) -> str:
        return str(self.raw.get("dataset_name", ""))

    @property
    def dataset_dir(self) -> Path:
        """Absolute path of the dataset at planning time."""
        return Path(self.raw.get("dataset_dir", ""))

    @property
    def labels(self) -> dict[int, str]:
        """Label id -> name, background (0) included."""
        return {int(k): str(v) for k, v in self.raw["labels"].items()}

    @property
    def channel_names(self) -> list[str]:
        return [str(c) for c in self.raw["channel_names"]]

    @property
    def num_channels(self) -> int:
        return len(self.raw["channel_names"])

    @property
    def num_classes(self) -> int:
        """Number of output classes, background included (`max label id + 1`)."""
        return max(self.labels) + 1


def identity_hash(identity: dict[str, Any]) -> str:
    """sha256 of a `Plans.network_identity` dict as canonical JSON (sorted keys, no whitespace)."""
    canon = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


def identity_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`key: old -> new` for every entry that differs between two `Plans.network_identity` dicts."""
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and key == "configuration":
            diffs += identity_differences(a, b)
        elif a != b:
            diffs.append(f"{key}: {json.dumps(a)} -> {json.dumps(b)}")
    return diffs
