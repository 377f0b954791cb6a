"""Small synthetic NIfTI datasets for tests (seeded, a few kB each)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

SHIPPED = Path(__file__).resolve().parents[1] / "medseg3d" / "resources" / "hippocampus_mini"


def blob_label(shape=(20, 24, 16), seed=0) -> np.ndarray:
    """Two ellipsoids labelled 1 and 2 in a background of 0."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(float)
    label = np.zeros(shape, np.uint8)
    for value in (1, 2):
        centre = rng.uniform(0.3, 0.7, 3) * np.array(shape)
        radii = rng.uniform(0.15, 0.25, 3) * np.array(shape)
        label[(((grid - centre) / radii) ** 2).sum(-1) <= 1] = value
    return label


def save(array: np.ndarray, path: Path, affine=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return path


def make_msd(root: Path, n_cases=3, channels=("MRI",), shape=(20, 24, 16), seed=0) -> Path:
    """An MSD-layout dataset: 4D images when several channels."""
    rng = np.random.default_rng(seed)
    training = []
    for i in range(n_cases):
        label = blob_label(shape, seed + i)
        img = [rng.normal(100 * (c + 1), 10, shape).astype(np.float32) + 50 * label for c in range(len(channels))]
        data = img[0] if len(channels) == 1 else np.stack(img, -1)
        name = f"case_{i:03d}"
        save(data, root / "imagesTr" / f"{name}.nii.gz")
        save(label, root / "labelsTr" / f"{name}.nii.gz")
        training.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
    meta = {"name": "Synth", "modality": {str(i): c for i, c in enumerate(channels)},
            "labels": {"0": "background", "1": "a", "2": "b"}, "numTraining": n_cases, "training": training}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def make_nnunet(root: Path, n_cases=3, channels=("CT", "MR"), shape=(20, 24, 16), seed=0) -> Path:
    """An nnU-Net v2 raw dataset: CASE_XXXX files per channel."""
    rng = np.random.default_rng(seed)
    for i in range(n_cases):
        label = blob_label(shape, seed + i)
        name = f"case_{i:03d}"
        for c in range(len(channels)):
            save(rng.normal(0, 1, shape).astype(np.float32) + label, root / "imagesTr" / f"{name}_{c:04d}.nii.gz")
        save(label, root / "labelsTr" / f"{name}.nii.gz")
    meta = {"channel_names": {str(i): c for i, c in enumerate(channels)},
            "labels": {"background": 0, "a": 1, "b": 2}, "numTraining": n_cases, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def plan_shipped(tmp_path_factory) -> Path:
    """A WORK_DIR planned (and preprocessed) from the shipped hippocampus_mini by `medseg3d plan`."""
    import pytest

    from medseg3d.cli import main

    wd = tmp_path_factory.mktemp("wd")
    with pytest.raises(SystemExit) as ex:
        main(["plan", str(SHIPPED), "-o", str(wd), "-j", "1"])
    assert ex.value.code in (0, None)
    return wd


def pointwise_model():
    """A 3-class 'network' from the intensity alone: fast, needs no checkpoint, output known voxel by voxel."""
    import torch
    from torch import nn

    class Pointwise(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            v = x[:, :1]
            return torch.cat([-4 * v, 4 * v - 2, torch.zeros_like(v)], dim=1)

    return Pointwise()


def tiny_train_args(iterations: int = 1) -> list[str]:
    """`medseg3d train` flags for a seconds-long CPU run on the shipped data (tiny network and patch)."""
    return ["--epochs", "1", "--iterations-per-epoch", str(iterations), "--patch-size", "16,24,16", "--features",
            "4,8,16,16", "--batch-size", "2", "--no-amp", "--val-iterations", "1", "--no-val-tta", "--num-workers",
            "0", "--no-final-validation", "--device", "cpu"]


def train_shipped(tmp_path_factory, folds=("0",), iterations: int = 1) -> Path:
    """`plan_shipped`, then `folds` trained with `tiny_train_args(iterations)`; returns the WORK_DIR."""
    import pytest

    from medseg3d.cli import main

    wd = plan_shipped(tmp_path_factory)
    for fold in folds:
        with pytest.raises(SystemExit) as ex:
            main(["train", str(wd), "--fold", str(fold), *tiny_train_args(iterations)])
        assert ex.value.code in (0, None)
    return wd


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """Exit code and captured stdout + stderr of `medseg3d ARGV` run in-process."""
    import pytest

    from medseg3d.cli import main

    with pytest.raises(SystemExit) as ex:
        main(argv)
    return int(ex.value.code or 0), "".join(capsys.readouterr())
