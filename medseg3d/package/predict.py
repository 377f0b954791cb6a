"""`medseg3d predict -m model.zip`: predict_folder with a package's networks, plan and postprocessing."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from medseg3d.package.read import open_package

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
    from medseg3d.cascade import extra_channels
    from medseg3d.inference.backends import backend_of, to_backend
    from medseg3d.inference.folder import predict_folder

    pkg = open_package(package)
    pkg.check_selection(config, arch, checkpoint)
    requested = kwargs.get("backend", "auto")
    backend = _package_backend(kwargs)
    # `auto` exports a fold the package holds no network for on the fly (cached), as for a WORK_DIR, so
    # `-m model.zip` and `-m WORK_DIR` run the same backend; a backend asked for by name needs the
    # package's own export (`medseg3d export --format`) and says so
    exported = (lambda f: pkg.network_members(f) or None) if requested == "auto" else pkg.network_members
    models = to_backend(pkg.load_models(folds), backend,
                        in_channels=pkg.plans.num_channels + extra_channels(pkg.plans, pkg.configuration),
                        patch_size=pkg.plans.configuration(pkg.configuration).for_architecture(pkg.architecture).patch_size,
                        folds=pkg.select_folds(folds), exported=exported, source=str(pkg.path),
                        required=requested != "auto")
    backend = backend_of(models)  # auto: a network that does not export keeps every fold on torch (logged)
    with tempfile.TemporaryDirectory(prefix="medseg3d_package_") as tmp:
        work_dir = pkg.write_work_dir(Path(tmp))
        return predict_folder(work_dir, input_path, output_dir, config=pkg.configuration, arch=pkg.architecture,
                              models=models, **{**kwargs, "backend": backend})


def _package_backend(kwargs: dict[str, Any]) -> str:
    """The backend `predict_package` runs (`kwargs`: predict_folder's backend, device, precision)."""
    from medseg3d.device import resolve_device
    from medseg3d.inference.backends import resolve_backend
    from medseg3d.inference.predictor import resolve_amp

    dev = resolve_device(kwargs.get("device", "auto"))
    precision = kwargs.get("precision", "auto")
    return resolve_backend(kwargs.get("backend", "auto"), dev, resolve_amp(precision, dev), precision)
