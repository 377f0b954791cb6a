"""predict_case / predict_folder / `medseg3d predict` on the shipped hippocampus_mini and synthetic volumes."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage
from torch import nn

from medseg3d.cli import main
from medseg3d.errors import InputError
from medseg3d.inference import predict_case, save_checkpoint
from medseg3d.inference.folder import PredictionError, predict_folder, split_part
from medseg3d.io import read_volume
from medseg3d.io.volume import Volume
from medseg3d.networks import build_network
from medseg3d.plans.schema import Plans
from medseg3d.preprocess.pipeline import preprocess_case, probs_to_original

torch.set_num_threads(1)
MINI = Path(__file__).resolve().parents[1] / "medseg3d" / "resources" / "hippocampus_mini"
SMALL = {"strides": [[1, 1, 1], [2, 2, 2]], "kernel_sizes": [[3, 3, 3], [3, 3, 3]], "features": [4, 8]}


class Pointwise(nn.Module):
    """3 classes from the (normalised) intensity alone: fast, and its output is known voxel by voxel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x[:, :1]
        return torch.cat([-4 * v, 4 * v - 2, torch.zeros_like(v) + 0.5 * torch.cos(6 * v)], dim=1)


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory) -> Path:
    wd = tmp_path_factory.mktemp("wd")
    with pytest.raises(SystemExit) as ex:
        main(["plan", str(MINI), "-o", str(wd), "-j", "1"])
    assert ex.value.code in (0, None)
    return wd


def save_random_fold(wd: Path, config: str, fold: int, seed: int, plan_hash: str | None = None) -> None:
    plans = Plans.load(wd)
    cfg = plans.configuration(config)
    dims = cfg.dims
    kw = {"dims": dims, "strides": [s[:dims] for s in SMALL["strides"]],
          "kernel_sizes": [k[:dims] for k in SMALL["kernel_sizes"]], "features": SMALL["features"]}
    torch.manual_seed(seed)
    net = build_network("unet", in_channels=plans.num_channels, num_classes=plans.num_classes, **kw)
    save_checkpoint(wd / "results" / config / "unet" / f"fold_{fold}" / "checkpoint_final.pt", {
        "plan_hash": plan_hash or plans.network_hash(config), "plan_identity": plans.network_identity(config),
        "configuration": config, "architecture": "unet",
        "network_kwargs": kw, "in_channels": plans.num_channels, "num_classes": plans.num_classes,
        "model": net.state_dict()})


def oblique_lps_affine(spacing=(1.0, 1.2, 0.9)) -> np.ndarray:
    c, s = np.cos(0.3), np.sin(0.3)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.array([[1, 0, 0], [0, np.cos(0.2), -np.sin(0.2)],
                                                                     [0, np.sin(0.2), np.cos(0.2)]])
    aff = np.eye(4)
    aff[:3, :3] = np.diag([-1, -1, 1]) @ rot @ np.diag(spacing)  # LPS-like, oblique
    aff[:3, 3] = [12.5, -30.25, 7.0]
    return aff


def test_oblique_non_ras_input_comes_back_with_an_identical_header(work_dir, tmp_path):
    rng = np.random.default_rng(0)
    arr = ndimage.gaussian_filter(rng.normal(size=(21, 30, 17)), 2).astype(np.float32) * 100 + 50
    img = nib.Nifti1Image(arr, oblique_lps_affine())
    img.set_sform(oblique_lps_affine(), code=2)
    img.set_qform(oblique_lps_affine(), code=1)
    src = tmp_path / "in" / "obl_001.nii.gz"
    src.parent.mkdir()
    nib.save(img, src)
    summary = predict_folder(work_dir, src, tmp_path / "out", models=[Pointwise()], device="cpu")
    assert summary.predicted == ["obl_001"]
    a, b = nib.load(src), nib.load(tmp_path / "out" / "obl_001.nii.gz")
    assert b.shape == a.shape and b.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(b.affine, a.affine)
    for get in ("get_sform", "get_qform"):
        fa, ca = getattr(a.header, get)(coded=True)
        fb, cb = getattr(b.header, get)(coded=True)
        np.testing.assert_allclose(fb, fa, atol=1e-6)
        assert ca == cb
    np.testing.assert_allclose(b.header.get_zooms(), a.header.get_zooms())
    assert nib.aff2axcodes(b.affine) == nib.aff2axcodes(a.affine)
    seg = np.asarray(b.dataobj)
    assert set(np.unique(seg)) <= {0, 1, 2} and len(np.unique(seg)) > 1


def test_resampled_case_bounded_path_matches_full_probabilities(work_dir):
    plans = Plans.load(work_dir)
    image = read_volume(MINI / "imagesTs" / "hippocampus_314.nii.gz")
    aff = image.affine.copy()
    aff[:3, :3] = aff[:3, :3] @ np.diag([0.7, 1.3, 0.8])  # spacing no longer the plan's 1 mm
    image = Volume(image.array, aff, None)
    torch.manual_seed(0)
    model = build_network("unet", in_channels=1, num_classes=3, dims=3, **SMALL).eval()
    seg, probs = predict_case([model], image, plans, "3d_fullres", use_mirroring=False, device="cpu",
                              return_probabilities=True, precision="fp32")
    assert seg.shape == image.spatial_shape and seg.dtype == np.uint8
    assert probs.shape == (3, *image.spatial_shape)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=2e-3)  # stored as float16 at network spacing
    agree = (np.argmax(probs, 0) == seg).mean()
    assert agree > 0.999, agree  # one class at a time + running max == argmax of the full array


def test_predict_case_checks_inputs(work_dir):
    plans = Plans.load(work_dir)
    image = read_volume(MINI / "imagesTs" / "hippocampus_314.nii.gz")
    with pytest.raises(InputError, match="2 channel"):
        predict_case([Pointwise()], image.with_array(np.concatenate([image.array] * 2)), plans, "3d_fullres")
    bad = image.array.copy()
    bad[0, 3, 3, 3] = np.nan
    with pytest.raises(InputError, match="case x: .*NaN"):
        predict_case([Pointwise()], image.with_array(bad), plans, "3d_fullres", case="x")
    with pytest.raises(InputError, match="spatial dimensions"):
        predict_case([Pointwise()], Volume(image.array[..., 0], np.eye(4)), plans, "3d_fullres")


def test_pointwise_prediction_equals_the_known_function(work_dir):
    plans = Plans.load(work_dir)
    image = read_volume(MINI / "imagesTs" / "hippocampus_329.nii.gz")
    seg, _ = predict_case([Pointwise()], image, plans, "3d_fullres", device="cpu", precision="fp32")
    pre = preprocess_case(image, plans.configuration("3d_fullres"))
    with torch.no_grad():
        p = torch.softmax(Pointwise()(torch.from_numpy(pre.data)[None]), 1)[0].numpy()
    ref = np.argmax(probs_to_original(p, pre.properties), 0)
    np.testing.assert_array_equal(seg, ref)


def test_num_parts_cover_every_case_exactly_once(work_dir, tmp_path):
    items = list(range(11))
    for k in (1, 2, 3, 5, 11, 13):
        parts = [split_part(items, k, i) for i in range(k)]
        assert sorted(x for p in parts for x in p) == items
    with pytest.raises(InputError):
        split_part(items, 2, 2)
    written = []
    for i in range(3):
        out = tmp_path / f"part{i}"
        s = predict_folder(work_dir, MINI / "imagesTs", out, models=[Pointwise()], num_parts=3, part_id=i,
                           use_mirroring=False)
        written += s.predicted
        assert sorted(p.name for p in out.glob("*.nii.gz")) == sorted(f"{c}.nii.gz" for c in s.predicted)
    assert sorted(written) == sorted(p.name[:-7] for p in (MINI / "imagesTs").glob("*.nii.gz"))


def test_failing_case_does_not_stop_the_others(work_dir, tmp_path):
    inp = shutil.copytree(MINI / "imagesTs", tmp_path / "in")
    victim = sorted(inp.glob("*.nii.gz"))[1]
    img = nib.load(victim)
    arr = np.asarray(img.dataobj).astype(np.float32)
    arr[5, 5, 5] = np.inf
    nib.save(nib.Nifti1Image(arr, img.affine, img.header), victim)
    with pytest.raises(PredictionError) as err:
        predict_folder(work_dir, inp, tmp_path / "out", models=[Pointwise()], use_mirroring=False)
    name = victim.name[:-7]
    assert name in str(err.value) and "1 of 4" in str(err.value)
    assert err.value.summary.failed[0][0] == name and len(err.value.summary.predicted) == 3
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        p.name for p in inp.glob("*.nii.gz") if p != victim)  # and no temporary file left


def test_existing_outputs_are_kept_unless_overwrite(work_dir, tmp_path):
    out = tmp_path / "out"
    predict_folder(work_dir, MINI / "imagesTs", out, models=[Pointwise()], use_mirroring=False)
    target = sorted(out.iterdir())[0]
    target.write_bytes(b"old")
    s = predict_folder(work_dir, MINI / "imagesTs", out, models=[Pointwise()], use_mirroring=False)
    assert len(s.skipped) == 4 and not s.predicted and target.read_bytes() == b"old"
    s = predict_folder(work_dir, MINI / "imagesTs", out, models=[Pointwise()], use_mirroring=False, overwrite=True)
    assert len(s.predicted) == 4 and nib.load(target).shape == nib.load(MINI / "imagesTs" / target.name).shape
    assert len(list(out.iterdir())) == 4


def test_postprocessing_from_the_model_folder_is_applied(work_dir, tmp_path):
    plans = Plans.load(work_dir)
    image = read_volume(MINI / "imagesTs" / "hippocampus_341.nii.gz")
    seg, _ = predict_case([Pointwise()], image, plans, "3d_fullres", use_mirroring=False)
    n_before = ndimage.label(seg > 0, np.ones((3, 3, 3)))[1]
    assert n_before > 1
    mdir = work_dir / "results" / "3d_fullres" / "unet"
    mdir.mkdir(parents=True, exist_ok=True)
    (mdir / "postprocessing.json").write_text('{"largest_component_foreground": true, "largest_component_classes": []}')
    try:
        predict_folder(work_dir, MINI / "imagesTs" / "hippocampus_341.nii.gz", tmp_path / "o", models=[Pointwise()],
                       use_mirroring=False)
    finally:
        (mdir / "postprocessing.json").unlink()
    out = np.asarray(nib.load(tmp_path / "o" / "hippocampus_341.nii.gz").dataobj)
    assert ndimage.label(out > 0, np.ones((3, 3, 3)))[1] == 1  # 26-connected, as postprocess counts


def test_cli_two_folds_end_to_end_and_fold_errors(work_dir, tmp_path, capsys):
    wd = shutil.copytree(work_dir, tmp_path / "wd", ignore=shutil.ignore_patterns("preprocessed"))
    save_random_fold(wd, "3d_fullres", 0, 0)
    save_random_fold(wd, "3d_fullres", 1, 1)
    out = tmp_path / "pred"
    with pytest.raises(SystemExit) as ex:
        main(["predict", "-m", str(wd), "-i", str(MINI / "imagesTs"), "-o", str(out), "--folds", "0,1", "--no-tta",
              "--device", "cpu"])
    assert ex.value.code in (0, None)
    for src in (MINI / "imagesTs").glob("*.nii.gz"):
        a, b = nib.load(src), nib.load(out / src.name)
        assert b.shape == a.shape and b.get_data_dtype() == np.uint8
        np.testing.assert_array_equal(b.affine, a.affine)
    with pytest.raises(SystemExit) as ex:
        main(["predict", "-m", str(wd), "-i", str(MINI / "imagesTs"), "-o", str(out), "--folds", "0,3"])
    assert ex.value.code == 2
    err = capsys.readouterr().err
    assert "fold(s) 3" in err and "folds with one: 0, 1" in err


def test_checkpoint_of_another_plan_is_refused(work_dir, tmp_path, capsys):
    wd = shutil.copytree(work_dir, tmp_path / "wd", ignore=shutil.ignore_patterns("preprocessed"))
    save_random_fold(wd, "3d_fullres", 0, 0, plan_hash="f" * 64)
    with pytest.raises(SystemExit) as ex:
        main(["predict", "-m", str(wd), "-i", str(MINI / "imagesTs"), "-o", str(tmp_path / "o")])
    assert ex.value.code == 2 and "another plan" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_cli_2d_configuration(work_dir, tmp_path):
    wd = shutil.copytree(work_dir, tmp_path / "wd", ignore=shutil.ignore_patterns("preprocessed"))
    save_random_fold(wd, "2d", 0, 0)
    src = MINI / "imagesTs" / "hippocampus_360.nii.gz"
    with pytest.raises(SystemExit) as ex:
        main(["predict", "-m", str(wd), "-i", str(src), "-o", str(tmp_path / "o"), "--config", "2d"])
    assert ex.value.code in (0, None)
    assert nib.load(tmp_path / "o" / src.name).shape == nib.load(src).shape


def test_multichannel_nnunet_naming(work_dir, tmp_path):
    raw = copy.deepcopy(Plans.load(work_dir).raw)
    raw["channel_names"] = ["T1", "T2"]
    for c in raw["configurations"].values():
        c["normalization"] = c["normalization"] * 2
    wd = tmp_path / "wd"
    wd.mkdir()
    Plans(raw).save(wd / "plans.json")
    inp = tmp_path / "in"
    inp.mkdir()
    src = nib.load(MINI / "imagesTs" / "hippocampus_314.nii.gz")
    for ch in (0, 1):
        nib.save(src, inp / f"case7_{ch:04d}.nii.gz")
    s = predict_folder(wd, inp, tmp_path / "o", models=[Pointwise()], use_mirroring=False)
    assert s.predicted == ["case7"] and nib.load(tmp_path / "o" / "case7.nii.gz").shape == src.shape


def test_fold_all_is_found_and_named(work_dir, tmp_path):
    from medseg3d.inference.folder import available_folds, load_fold_models

    wd = shutil.copytree(work_dir, tmp_path / "wd", ignore=shutil.ignore_patterns("preprocessed"))
    save_random_fold(wd, "3d_fullres", 0, 0)
    mdir = wd / "results" / "3d_fullres" / "unet"
    shutil.copytree(mdir / "fold_0", mdir / "fold_all")
    assert available_folds(mdir, "final") == [0, "all"]
    identity = Plans.load(wd).network_identity("3d_fullres")
    assert len(load_fold_models(wd, "3d_fullres", "unet", ["all"], "final", identity)) == 1
    shutil.rmtree(mdir / "fold_0")
    assert len(load_fold_models(wd, "3d_fullres", "unet", None, "final", identity)) == 1  # fold_all alone


def test_slab_export_equals_argmax_of_the_whole_resampled_probabilities(monkeypatch):
    """The bounded export (slabs of rows, class by class) labels like argmax of all classes resampled at once."""
    from medseg3d.inference import predictor
    from medseg3d.preprocess.resample import resample_data

    rng = np.random.default_rng(2)
    logits = rng.normal(size=(4, 19, 23, 11)).astype(np.float32)
    probs = (np.exp(logits) / np.exp(logits).sum(0)).astype(np.float16)
    props = {"shape_after_crop": [40, 30, 25], "bbox": [[2, 42], [0, 30], [5, 30]], "original_shape": [45, 30, 33]}
    ref = np.argmax(resample_data(probs, (40, 30, 25), order=1), 0)
    monkeypatch.setattr(predictor, "_EXPORT_SLAB_VOXELS", 30 * 25 * 3)  # 3 rows per slab: 14 slabs
    seg = predictor.probabilities_to_seg(probs, props)
    assert seg.shape == (45, 30, 33) and seg.dtype == np.uint8
    assert (seg[:2] == 0).all() and (seg[:, :, :5] == 0).all() and (seg[:, :, 30:] == 0).all()
    assert (seg[2:42, :, 5:30] == ref).mean() > 0.9999


def test_default_batch_is_one_for_a_wide_3d_float32_network_on_an_avx2_cpu(monkeypatch):
    """Measured on an AVX2 CPU in fp32: the 32-256 U-Net is faster one window at a time (0.37 vs 0.58 s/patch at
    batch 8), narrower ones batched (8-64: 0.27 vs 0.055); AVX-512, bf16 and the GPU batch."""
    from medseg3d.inference import predictor
    from medseg3d.inference.predictor import default_batch_size

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert default_batch_size((40, 56, 40), 3, cpu, None, 32) == 1
    assert default_batch_size((40, 56, 40), 3, cpu, None, 16) == 8      # 2^21 / 89,600 voxels = 23, at most 8
    assert default_batch_size((40, 56, 40), 3, cpu, None) == 8          # width unknown: the voxel rule
    assert default_batch_size((40, 56, 40), 3, cpu, torch.bfloat16, 32) == 8
    assert default_batch_size((40, 56, 40), 3, cuda, torch.float16, 32) == 8
    assert default_batch_size((128, 128, 128), 3, cuda, None, 32) == 1
    assert default_batch_size((56, 40), 2, cpu, None, 32) == 32         # 2D: not measured, the voxel rule
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert predictor._wide_simd_cpu()
    assert default_batch_size((40, 56, 40), 3, cpu, None, 32) == 8


def test_the_first_width_comes_from_the_network_itself():
    from medseg3d.inference.predictor import _first_width
    from medseg3d.networks import build_network

    net = build_network("unet", in_channels=1, num_classes=3, deep_supervision=False, features=[8, 16, 32, 64], dims=3,
                        strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]], kernel_sizes=[[3, 3, 3]] * 4,
                        patch_size=[40, 56, 40], options={})
    assert _first_width([net]) == 8
    assert _first_width([nn.Identity()]) is None
