"""The Python API: `Segmenter`, a trained model (package zip or WORK_DIR) as a callable on images.

    from medseg3d import Segmenter
    seg = Segmenter("model.zip")              # or a WORK_DIR; device="auto", config=None, folds=None, tta=True
    labels = seg("ct.nii.gz")                 # path -> nibabel image (what `predict` would write)
    labels = seg(nib_image)                   # nibabel -> nibabel, the input's header and affine
    labels = seg(sitk_image)                  # SimpleITK -> SimpleITK, the input's origin/spacing/direction
    labels = seg(array, spacing=(1, 1, 2.5))  # (X, Y, Z) or (C, X, Y, Z) numpy -> (X, Y, Z) uint8 array

Every call runs `medseg3d.inference.predict_case`, the one function `predict` and training's final
validation use, so a file gives the labels `medseg3d predict` writes for it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medseg3d.errors import InputError

log = logging.getLogger(__name__)


class Segmenter:
    """Fold networks, plan and postprocessing of one model, loaded once; call it on images.

    Args:
        model: a model package (`.zip` from `medseg3d export`) or a WORK_DIR.
        device: `auto` (CUDA when available), `cuda`, `cuda:N` or `cpu`.
        config: plan configuration (None: the package's; for a WORK_DIR `3d_fullres`, else the plan's first).
        folds: folds to average (None: every fold of the package / every trained fold).
        tta: mirror test-time augmentation (about 8x slower in 3D).
        arch: architecture (None: the package's / the plan's).
        checkpoint: `final`, `best` or `latest` (a WORK_DIR only; a package holds one set of weights).
        step: sliding-window step as a fraction of the patch.
        precision: `auto`, `fp32`, `bf16` or `fp16` (as `predict --precision`).
        batch_size: network inputs per forward pass (None: from the patch size).
        backend: `auto`, `torch`, `onnxruntime` or `openvino` (as `predict --backend`; `auto` follows
            `inference.backends.CPU_AUTO_ORDER`, torch for now), so a Segmenter gives what `predict`
            writes.
    """

    def __init__(
        self,
        model: str | Path,
        *,
        device: str = "auto",
        config: str | None = None,
        folds: Sequence[int | str] | None = None,
        tta: bool = True,
        arch: str | None = None,
        checkpoint: str = "final",
        step: float = 0.5,
        precision: str = "auto",
        batch_size: int | None = None,
        backend: str = "auto",
    ) -> None:
        from medseg3d.device import resolve_device
        from medseg3d.package import is_package

        if not 0 < step <= 1:
            raise InputError(f"step must be in (0, 1] (a fraction of the patch), got {step}")
        self.source = Path(model)
        folds = None if folds is None else list(folds)
        if is_package(self.source):
            from medseg3d.package import open_package

            pkg = open_package(self.source)
            pkg.check_selection(config, arch, None)
            self.plans, self.config, self.arch = pkg.plans, pkg.configuration, pkg.architecture
            self.models = pkg.load_models(folds)
            self.postprocessing = pkg.postprocessing
            exported = (lambda f: pkg.network_members(f) or None) if backend == "auto" else pkg.network_members
            model_folds = pkg.select_folds(folds)
        else:
            from medseg3d.inference.folder import load_fold_models
            from medseg3d.paths import model_dir_of
            from medseg3d.plans.schema import Plans
            from medseg3d.postprocess import load_postprocessing

            self.plans = Plans.load(self.source)
            names = list(self.plans.configurations)
            self.config = config or ("3d_fullres" if "3d_fullres" in names or not names else names[0])
            self.arch = arch or self.plans.configuration(self.config).architecture
            self.models = load_fold_models(self.source, self.config, self.arch, folds, checkpoint,
                                           self.plans.network_identity(self.config, self.arch), self.plans.file_hash)
            self.postprocessing = load_postprocessing(model_dir_of(self.source, self.config, self.arch))
            exported, model_folds = None, folds
        self.device = resolve_device(device)
        self.models = [m.to(self.device).eval() for m in self.models]
        from medseg3d.cascade import extra_channels
        from medseg3d.inference.backends import backend_of, resolve_backend, to_backend
        from medseg3d.inference.predictor import resolve_amp

        self.backend = resolve_backend(backend, self.device, resolve_amp(precision, self.device), precision)
        if self.backend != "torch":
            view = self.plans.configuration(self.config).for_architecture(self.arch)
            channels = self.plans.num_channels + extra_channels(self.plans, self.config)  # + K - 1 for a cascade
            self.models = to_backend(self.models, self.backend, in_channels=channels,
                                     patch_size=view.patch_size, folds=model_folds, exported=exported,
                                     source=str(self.source), required=backend != "auto")
            self.backend = backend_of(self.models)  # `auto`: a network that did not export keeps torch
        precision = "fp32" if self.backend != "torch" else precision  # the other backends run float32
        self.tta, self.step, self.precision, self.batch_size = tta, step, precision, batch_size

    @property
    def labels(self) -> dict[int, str]:
        """Label id -> name, background (0) included."""
        return self.plans.labels

    def __repr__(self) -> str:
        return (f"Segmenter({str(self.source)!r}, config={self.config!r}, arch={self.arch!r}, "
                f"folds={len(self.models)}, device={str(self.device)!r}, tta={self.tta})")

    def predict_volume(self, volume: Any, case: str = "") -> np.ndarray:
        """Labels `(X, Y, Z)` uint8 (uint16 above 255 classes) of a `medseg3d.io.Volume` `(C, X, Y, Z)`."""
        from medseg3d.inference.predictor import predict_case

        seg, _ = predict_case(self.models, volume, self.plans, self.config, step=self.step, use_mirroring=self.tta,
                              device=self.device, postprocessing=self.postprocessing, precision=self.precision,
                              batch_size=self.batch_size, case=case, arch=self.arch)
        return seg

    def __call__(self, image: Any, spacing: Sequence[float] | None = None) -> Any:
        """Segment `image`: a path (NIfTI; returns a nibabel image), a nibabel image (returns one), a
        SimpleITK image (returns one) or a numpy array `(X, Y, Z)` / `(C, X, Y, Z)` with `spacing` in mm
        per array axis (returns an `(X, Y, Z)` array). Labels come back in the input's own voxel grid,
        with its geometry (header/affine, or origin/spacing/direction)."""
        from medseg3d.io import convert

        if isinstance(image, (str, Path)):
            from medseg3d.io import read_volume

            volume = read_volume(image)
            return convert.labels_like_nifti(self.predict_volume(volume, Path(image).name), volume)
        if convert.is_nifti_image(image):
            volume = convert.volume_from_nifti(image)
            return convert.labels_like_nifti(self.predict_volume(volume), volume)
        if convert.is_sitk_image(image):
            return convert.labels_like_sitk(self.predict_volume(convert.volume_from_sitk(image)), image)
        if isinstance(image, np.ndarray):
            return self.predict_volume(convert.volume_from_array(image, spacing))
        raise InputError(f"cannot segment a {type(image).__name__}; give a file path, a nibabel image, a SimpleITK "
                         "image or a numpy array with spacing=")
