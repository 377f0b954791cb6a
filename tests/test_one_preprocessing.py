"""Prediction sees what training saw, plans survive re-planning, nnU-Net's 2d and dummy-2D recipes.

One preprocessing function (`preprocess_arrays`) serves the cache writer, the final validation and
`medseg3d predict`; the plan hash covers only what a trained network depends on.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from medseg3d.cli import main
from medseg3d.data.augment import AugmentParams, augment_params_for, low_resolution, spatial_transform
from medseg3d.data.loader import enlarged_patch
from medseg3d.inference import predict_case
from medseg3d.inference import predictor as predictor_mod
from medseg3d.io import load_dataset, read_volume
from medseg3d.plans.schema import Plans
from medseg3d.preprocess.cache import load_case
from medseg3d.preprocess.normalize import normalize
from medseg3d.preprocess.run import preprocess_dataset
from tests._synth import blob_label, save

torch.set_num_threads(1)


def brain_dataset(root: Path, n_cases: int = 3, shape=(28, 32, 20), slice_spacings=None, seed: int = 0) -> Path:
    """MSD dataset of skull-stripped-like MRI: intensities inside an ellipsoid 'brain' (with a few zero
    voxels inside it), exactly 0 outside; labels inside the brain. `slice_spacings`: per-case z spacing."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(float)
    training = []
    for i in range(n_cases):
        centre = np.array(shape) / 2 + rng.uniform(-1, 1, 3)
        brain = (((grid - centre) / (np.array(shape) * 0.42)) ** 2).sum(-1) <= 1
        label = blob_label(shape, seed + i) * brain
        img = np.where(brain, rng.normal(300, 60, shape) + 80 * label, 0).astype(np.float32)
        img[brain & (rng.random(shape) < 0.01)] = 0  # holes: the mask is the filled non-zero region
        z = 1.0 if slice_spacings is None else slice_spacings[i]
        affine = np.diag([1.0, 1.0, z, 1.0])
        name = f"brain_{i:03d}"
        save(img, root / "imagesTr" / f"{name}.nii.gz", affine)
        save(label.astype(np.uint8), root / "labelsTr" / f"{name}.nii.gz", affine)
        training.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
    meta = {"name": "Brains", "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "a", "2": "b"},
            "numTraining": n_cases, "training": training}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def cli(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    return 0 if exc.value.code is None else int(exc.value.code)


def capture_network_input(monkeypatch) -> list[torch.Tensor]:
    """Record the preprocessed array `predict_case` hands the sliding window."""
    seen: list[torch.Tensor] = []
    real = predictor_mod.sliding_window_slabs

    def spy(models, data, **kw):
        seen.append(data.clone())
        return real(models, data, **kw)

    monkeypatch.setattr(predictor_mod, "sliding_window_slabs", spy)
    return seen


@pytest.mark.parametrize("use_mask", [True, False])
def test_predict_feeds_the_network_the_cached_training_array(tmp_path, monkeypatch, use_mask):
    data = brain_dataset(tmp_path / "data", n_cases=2)
    wd = tmp_path / "wd"
    assert cli(["plan", str(data), "-o", str(wd), "-j", "1", "--configs", "3d_fullres"]) == 0
    plans = Plans.load(wd)
    raw = plans.to_dict()
    for norm in raw["configurations"]["3d_fullres"]["normalization"]:
        norm["use_mask"] = use_mask
    plans = Plans(raw)
    plans.save(wd / "plans.json")
    shutil.rmtree(wd / "preprocessed")
    cases = load_dataset(data).cases
    preprocess_dataset(cases, plans, wd, ["3d_fullres"], workers=1)  # the cache writer of `medseg3d plan`

    seen = capture_network_input(monkeypatch)
    model = nn.Conv3d(1, 3, 1).eval()
    for case in cases:
        image = read_volume(case.images)
        predict_case([model], image, plans, "3d_fullres", use_mirroring=False, precision="fp32")
        net_input = seen[-1].numpy()
        cached, _, _ = load_case(wd, "3d_fullres", case.name, mmap=False)
        assert net_input.shape == cached.shape
        # the cache stores float16: the network input rounded the same way is the cached array
        assert np.abs(net_input.astype(np.float16).astype(np.float32) - cached.astype(np.float32)).max() <= 1e-6
        if use_mask:  # the masked z-score really was applied: outside the brain 0, not (0 - mean) / std
            crop = np.asarray(image.array)
            plain = normalize(crop, [{"scheme": "zscore", "use_mask": False}])
            assert not np.allclose(plain.min(), net_input.min(), atol=1e-3)
            assert (net_input == 0).mean() > 0.05


def train_tiny(wd: Path, config: str = "3d_fullres") -> None:
    cfg = Plans.load(wd).configuration(config)
    features = ",".join("4" for _ in cfg.features)
    assert cli(["train", str(wd), "--config", config, "--fold", "0", "--epochs", "1", "--iterations-per-epoch", "1",
                "--features", features, "--batch-size", "2", "--no-amp", "--val-iterations", "1", "--no-val-tta",
                "--device", "cpu", "--num-workers", "0"]) == 0


def test_replanning_keeps_trained_models_and_refuses_real_changes(tmp_path, capsys):
    data = brain_dataset(tmp_path / "a", n_cases=5, shape=(20, 24, 16))
    wd = tmp_path / "wd"
    assert cli(["plan", str(data), "-o", str(wd), "-j", "1", "--configs", "3d_fullres"]) == 0
    first = (wd / "plans.json").read_text()
    hash_before = Plans.load(wd).network_hash("3d_fullres")
    train_tiny(wd)

    # the same data from another folder: same hash, the trained fold still predicts
    moved = shutil.copytree(data, tmp_path / "b")
    shutil.rmtree(data)
    assert cli(["plan", str(moved), "-o", str(wd), "-j", "1", "--configs", "3d_fullres"]) == 0
    again = Plans.load(wd)
    assert again.network_hash("3d_fullres") == hash_before
    assert again.dataset_dir == moved.resolve()
    assert json.loads(first)["configurations"] == again.raw["configurations"]
    out = tmp_path / "pred"
    capsys.readouterr()
    assert cli(["predict", "-m", str(wd), "-i", str(moved / "imagesTr"), "-o", str(out), "--folds", "0",
                "--no-tta", "--device", "cpu"]) == 0, capsys.readouterr().err
    assert len(list(out.glob("*.nii.gz"))) == 5

    # adding 2d keeps 3d_fullres and its checkpoints
    assert cli(["plan", str(moved), "-o", str(wd), "-j", "1", "--configs", "2d"]) == 0
    both = Plans.load(wd)
    assert set(both.configurations) == {"2d", "3d_fullres"}
    assert both.network_hash("3d_fullres") == hash_before
    assert cli(["predict", "-m", str(wd), "-i", str(moved / "imagesTr"), "-o", str(tmp_path / "pred2"),
                "--folds", "0", "--no-tta", "--device", "cpu", "--config", "3d_fullres"]) == 0

    # a plan that really differs is refused, saying what differs
    raw = both.to_dict()
    raw["configurations"]["3d_fullres"]["spacing"] = [1.5, 1.5, 1.5]
    Plans(raw).save(wd / "plans.json")
    capsys.readouterr()
    assert cli(["predict", "-m", str(wd), "-i", str(moved / "imagesTr"), "-o", str(tmp_path / "pred3"),
                "--folds", "0", "--no-tta", "--device", "cpu", "--config", "3d_fullres"]) == 2
    err = capsys.readouterr().err.replace("\n", " ")
    assert "another plan" in err and "spacing: [1.0, 1.0, 1.0] -> [1.5, 1.5, 1.5]" in err
    assert "Traceback" not in err


def test_two_plan_runs_write_the_same_plans(tmp_path):
    data = brain_dataset(tmp_path / "data", n_cases=2, shape=(20, 24, 16))
    copy = shutil.copytree(data, tmp_path / "copy")
    for src, wd in ((data, "w1"), (data, "w2"), (copy, "w3")):
        assert cli(["plan", str(src), "-o", str(tmp_path / wd), "-j", "1"]) == 0
    p1, p2, p3 = (json.loads((tmp_path / w / "plans.json").read_text()) for w in ("w1", "w2", "w3"))
    assert p1 == p2
    assert {k: v for k, v in p1.items() if k != "dataset_dir"} == {k: v for k, v in p3.items() if k != "dataset_dir"}
    a, c = Plans(p1), Plans(p3)
    assert all(a.network_hash(n) == c.network_hash(n) for n in a.configurations)
    # what no network depends on leaves the hash alone
    raw = a.to_dict()
    raw.update(medseg3d_version="9.9", gpu_memory_gb=80.0, dataset_dir="/elsewhere")
    raw["configurations"]["3d_fullres"]["batch_size"] = 7
    assert Plans(raw).network_hash("3d_fullres") == a.network_hash("3d_fullres")


def test_default_gpu_budget_is_the_total_memory_not_the_free(monkeypatch):
    from medseg3d.plans import memory

    class Props:
        total_memory = int(79.6 * memory.GIB)

    monkeypatch.setattr(memory, "cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: Props())

    def free_changes():  # what other processes hold must not matter
        raise AssertionError("the free memory of the moment was asked for")

    monkeypatch.setattr(torch.cuda, "mem_get_info", free_changes)
    assert memory.default_budget_gb() == 79.0


def test_2d_keeps_each_cases_slice_spacing(tmp_path, monkeypatch):
    data = brain_dataset(tmp_path / "data", n_cases=3, shape=(40, 44, 12), slice_spacings=[3.0, 4.0, 5.0])
    wd = tmp_path / "wd"
    assert cli(["plan", str(data), "-o", str(wd), "-j", "1", "--configs", "2d,3d_fullres"]) == 0
    plans = Plans.load(wd)
    c2, c3 = plans.configuration("2d"), plans.configuration("3d_fullres")
    assert c2.slice_axis == 2 and c2.data_identifier == "2d" != c3.data_identifier
    for case, z in zip(load_dataset(data).cases, (3.0, 4.0, 5.0)):
        d2, _, p2 = load_case(wd, "2d", case.name, mmap=False)
        _, _, p3 = load_case(wd, "3d_fullres", case.name, mmap=False)
        assert p2["spacing"][2] == z and p2["shape_after_resample"][2] == p2["shape_after_crop"][2]
        assert p2["spacing"][:2] == list(c3.spacing[:2])
        assert p3["spacing"] == list(c3.spacing)
        image = read_volume(case.images)
        seen = capture_network_input(monkeypatch)
        seg, _ = predict_case([nn.Conv2d(1, 3, 1).eval()], image, plans, "2d", use_mirroring=False,
                              precision="fp32")
        assert seg.shape == image.spatial_shape
        assert np.abs(seen[-1].numpy().astype(np.float16).astype(np.float32) - d2.astype(np.float32)).max() <= 1e-6


def test_augmentation_rule_follows_nnunet():
    assert augment_params_for((40, 56, 40), (0, 1, 2)).dummy_2d_axis is None
    assert augment_params_for((40, 56, 40), (0, 1, 2)).rotation_deg == 30.0
    aniso = augment_params_for((160, 192, 12), (0, 1, 2))
    assert aniso.dummy_2d_axis == 2 and aniso.rotation_deg == 180.0
    assert augment_params_for((192, 160), (0, 1)).rotation_deg == 180.0
    assert augment_params_for((256, 96), (0, 1)).rotation_deg == 15.0
    assert enlarged_patch((32, 32, 8), aniso) == (40, 40, 8)
    assert enlarged_patch((32, 32, 8), AugmentParams()) == (40, 40, 10)


def test_dummy_2d_transforms_each_slice_on_its_own():
    """Every slice along the dummy axis carries its own constant: rotation, scaling and the
    low-resolution simulation must never mix two slices (a 3D transform would)."""
    g = torch.Generator().manual_seed(0)
    n = 4
    values = torch.arange(1, 11, dtype=torch.float32) * 10  # slice z has value 10 * (z + 1)
    image = values.reshape(1, 1, 1, 1, 10).expand(n, 1, 30, 30, 10).contiguous()
    label = torch.zeros(n, 1, 30, 30, 10, dtype=torch.int8)
    params = AugmentParams(p_rotation=1.0, p_scale=1.0, rotation_deg=180.0, dummy_2d_axis=2)
    img, _ = spatial_transform(image, label, (24, 24, 10), params, g)
    for z in range(10):
        sl = img[:, :, :, :, z]
        # in-plane borders blend with the zero padding; nothing may come from another slice
        assert (sl <= values[z] + 1e-4).all() and (sl >= 0).all(), z
        assert ((sl - values[z]).abs() < 1e-4).float().mean() > 0.5, z
    lowres = low_resolution(image, AugmentParams(p_lowres=1.0, dummy_2d_axis=2), g)
    assert torch.allclose(lowres, image)
    # the same batch through a full 3D rotation mixes slices: the test can fail
    mixed, _ = spatial_transform(image, label, (24, 24, 10), AugmentParams(p_rotation=1.0, p_scale=0.0), g)
    assert (mixed[..., 0] > values[0] + 1).any()
