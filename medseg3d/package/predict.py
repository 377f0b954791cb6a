"""`medseg3d predict -m model.zip`: predict_folder with a package's networks, plan and postprocessing."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from medseg3d.package.read import ModelPackage, open_package

log = logging.getLogger(__name__)


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
