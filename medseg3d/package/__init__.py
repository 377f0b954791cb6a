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
from typing import Any

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



# the package's reader, writer and predictor (after the names above, which they import)
from medseg3d.package.predict import predict_package  # noqa: E402
from medseg3d.package.read import ModelPackage, is_package, open_package  # noqa: E402
from medseg3d.package.write import write_package  # noqa: E402

__all__ = ["ModelPackage", "is_package", "open_package", "predict_package", "write_package", "MANIFEST",
           "PACKAGE_FORMAT", "PACKAGE_VERSION", "NETWORK_FORMATS", "weights_member", "metadata_member"]
