"""Folder evaluation on the shipped hippocampus labels, geometry checks, CLI, cross-validation."""

from __future__ import annotations

import csv
import json
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from medseg3d.cli import main
from medseg3d.errors import DatasetError
from medseg3d.evaluation.crossval import evaluate_crossval
from medseg3d.evaluation.evaluate import EvaluationError, evaluate_folders, match_cases
from medseg3d.plans.schema import CONFIG_KEYS
from medseg3d.postprocess import load_postprocessing
from tests._synth import SHIPPED

LABELS = SHIPPED / "labelsTr"


def _perturb(label: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Shift by a voxel, dilate class 1 a little, flip a few random voxels to 1 or 2."""
    out = ndimage.shift(label, tuple(int(s) for s in rng.integers(-1, 2, 3)), order=0)
    grow = ndimage.binary_dilation(out == 1) & (out == 0) & (rng.random(out.shape) < 0.3)
    out[grow] = 1
    noise = rng.random(out.shape) < 0.002
    out[noise] = rng.integers(1, 3, int(noise.sum()))
    return out.astype(np.uint8)


def _write_perturbed(folder: Path, names: list[Path], seed: int = 0, suffix: str = "") -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    preds = {}
    for path in names:
        img = nib.load(str(path))
        pred = _perturb(np.asarray(img.dataobj).astype(np.uint8), rng)
        name = path.name.replace(".nii.gz", "")
        nib.save(nib.Nifti1Image(pred, img.affine, img.header), str(folder / f"{name}{suffix}.nii.gz"))
        preds[name] = pred
    return preds


def _independent(ref: np.ndarray, pred: np.ndarray, spacing) -> dict:
    """Metrics from direct boolean arithmetic and loops (no confusion matrix), HD95 from MONAI."""
    import torch
    from monai.metrics import compute_hausdorff_distance

    torch.set_num_threads(1)
    out = {}
    for c in (1, 2):
        r, p = ref == c, pred == c
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hd = compute_hausdorff_distance(torch.from_numpy(p[None, None]), torch.from_numpy(r[None, None]),
                                            percentile=95, spacing=list(spacing)).item()
        out[c] = {"dice": 2 * (r & p).sum() / (r.sum() + p.sum()), "iou": (r & p).sum() / (r | p).sum(), "hd95": hd}
    classes = [c for c in range(3) if (ref == c).any() or (pred == c).any()]
    ious = [((ref == c) & (pred == c)).sum() / ((ref == c) | (pred == c)).sum() for c in classes]
    out["pa"] = (ref == pred).mean()
    out["mpa"] = np.mean([((ref == c) & (pred == c)).sum() / (ref == c).sum() for c in classes if (ref == c).any()])
    out["miou"] = np.mean(ious)
    out["fwiou"] = sum((ref == c).sum() * iou for c, iou in zip(classes, ious)) / ref.size
    return out


def test_hippocampus_vs_perturbed_matches_independent(tmp_path):
    refs = sorted(LABELS.glob("*.nii.gz"))[:8]
    preds = _write_perturbed(tmp_path / "pred", refs, suffix="_0000")  # _0000 names match too
    summary = evaluate_folders(tmp_path / "pred", LABELS, workers=2, json_path=tmp_path / "s.json",
                               csv_path=tmp_path / "s.csv")
    assert summary["num_cases"] == 8 and summary["labels"] == [1, 2]
    for case in summary["cases"]:
        img = nib.load(case["ref"])
        ref = np.asarray(img.dataobj).astype(np.int16)
        want = _independent(ref, preds[case["case"]].astype(np.int16), case["spacing"])
        for c in (1, 2):
            got = case["per_class"][c]
            assert got["dice"] == pytest.approx(want[c]["dice"], abs=1e-6)
            assert got["iou"] == pytest.approx(want[c]["iou"], abs=1e-6)
            assert got["hd95"] == pytest.approx(want[c]["hd95"], abs=1e-3)
            assert 0.3 < got["dice"] < 0.99  # the perturbation is real
        for key in ("pa", "mpa", "miou", "fwiou"):
            assert case[key] == pytest.approx(want[key], abs=1e-6), key
    saved = json.loads((tmp_path / "s.json").read_text())
    assert saved["mean"]["dice"] == pytest.approx(summary["mean"]["dice"])
    assert saved["per_class_mean"]["1"]["dice"] == pytest.approx(
        np.mean([c["per_class"][1]["dice"] for c in summary["cases"]]))
    rows = list(csv.DictReader((tmp_path / "s.csv").open()))
    assert len(rows) == 16 and rows[0]["case"] == summary["cases"][0]["case"]


def _label_copy(src: Path, dst: Path, affine=None, data=None) -> None:
    img = nib.load(str(src))
    arr = np.asarray(img.dataobj) if data is None else data
    nib.save(nib.Nifti1Image(arr, img.affine if affine is None else affine), str(dst))


def test_geometry_mismatches_are_reported_by_case(tmp_path):
    refs = sorted(LABELS.glob("*.nii.gz"))[:4]
    pred = tmp_path / "pred"
    pred.mkdir()
    a0 = nib.load(str(refs[0])).affine
    shifted = a0.copy()
    shifted[0, 3] += 1.0
    _label_copy(refs[0], pred / refs[0].name, affine=shifted)  # origin off by 1 mm
    scaled = nib.load(str(refs[1])).affine @ np.diag([1.0, 1.0, 1.2, 1.0])
    _label_copy(refs[1], pred / refs[1].name, affine=scaled)  # spacing
    _label_copy(refs[2], pred / refs[2].name, data=np.zeros((5, 5, 5), np.uint8))  # shape
    _label_copy(refs[3], pred / refs[3].name)  # fine
    with pytest.raises(EvaluationError) as info:
        evaluate_folders(pred, LABELS, workers=2)
    problems = dict(info.value.failed)
    names = [r.name.replace(".nii.gz", "") for r in refs]
    assert set(problems) == set(names[:3])
    assert "origin" in problems[names[0]] and "spacing" in problems[names[1]] and "shape" in problems[names[2]]
    assert [c["case"] for c in info.value.summary["cases"]] == [names[3]]  # the good case is still evaluated


def test_prediction_without_reference(tmp_path):
    (tmp_path / "pred").mkdir()
    shutil.copy(next(LABELS.glob("*.nii.gz")), tmp_path / "pred" / "stranger.nii.gz")
    pairs, problems = match_cases(tmp_path / "pred", LABELS)
    assert not pairs and [p.case for p in problems] == ["stranger"] and "no reference" in problems[0].what


def test_cli_folder_and_errors(tmp_path, capsys):
    refs = sorted(LABELS.glob("*.nii.gz"))[:3]
    _write_perturbed(tmp_path / "pred", refs, seed=1)
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", str(tmp_path / "pred"), str(LABELS), "--labels", "1,2,3", "--json", str(tmp_path / "m.json"),
              "--workers", "1"])
    assert exit_info.value.code in (0, None)
    saved = json.loads((tmp_path / "m.json").read_text())
    assert saved["labels"] == [1, 2, 3]
    assert saved["per_class_mean"]["3"]["dice"] == 1.0  # absent from both: documented value
    assert "mean" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", str(tmp_path / "pred"), str(LABELS), "--labels", "one"])
    assert exit_info.value.code == 2
    assert "Error: --labels" in capsys.readouterr().err


def _write_plans(work: Path, dataset_dir: Path) -> None:
    config = {key: None for key in CONFIG_KEYS}
    config.update(dims=3, architecture="unet")
    plans = {"schema_version": 1, "dataset_hash": "x", "dataset_name": "mini", "dataset_dir": str(dataset_dir),
             "channel_names": ["MRI"], "labels": {"0": "background", "1": "anterior", "2": "posterior"},
             "configurations": {"3d_fullres": config}}
    work.mkdir(parents=True, exist_ok=True)
    (work / "plans.json").write_text(json.dumps(plans))


def test_crossval_summary_and_postprocessing_choice(tmp_path, capsys):
    work = tmp_path / "work"
    _write_plans(work, SHIPPED)
    refs = sorted(LABELS.glob("*.nii.gz"))[:6]
    model = work / "results" / "3d_fullres" / "unet"
    for fold, chunk in ((0, refs[:3]), (1, refs[3:])):
        val = model / f"fold_{fold}" / "validation"
        val.mkdir(parents=True)
        for ref in chunk:
            img = nib.load(str(ref))
            pred = np.asarray(img.dataobj).astype(np.uint8)
            pred = ndimage.binary_erosion(pred > 0, iterations=1) * pred  # imperfect but one blob
            pred[:2, :2, :2] = 1  # a stray component far from the hippocampus
            nib.save(nib.Nifti1Image(pred, img.affine, img.header), str(val / ref.name))
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--model", str(work), "--config", "3d_fullres", "--workers", "2"])
    assert exit_info.value.code in (0, None)
    assert "postprocessing" in capsys.readouterr().out
    summary = json.loads((model / "crossval_summary.json").read_text())
    assert summary["num_cases"] == 6 and summary["folds"] == {
        "0": [r.name[:-7] for r in refs[:3]], "1": [r.name[:-7] for r in refs[3:]]}
    decision = load_postprocessing(model)
    assert decision["largest_component_foreground"] is True
    assert decision["dice_after"] > decision["dice_before"]
    assert decision["dice_before"] == pytest.approx(summary["mean"]["dice"])
    # --labels is honoured with --model: the report has class 2 only, the model folder's files keep both
    out_json = tmp_path / "only2.json"
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--model", str(work), "--config", "3d_fullres", "--labels", "2", "--json", str(out_json)])
    assert exit_info.value.code in (0, None)
    only2 = json.loads(out_json.read_text())
    assert list(only2["per_class_mean"]) == ["2"]
    assert only2["mean"]["dice"] == pytest.approx(summary["per_class_mean"]["2"]["dice"])
    assert set(json.loads((model / "crossval_summary.json").read_text())["per_class_mean"]) == {"1", "2"}
    assert load_postprocessing(model) == decision
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--model", str(work), "--config", "3d_fullres", "--labels", "3"])
    assert exit_info.value.code == 2 and "valid: 1 (" in capsys.readouterr().err
    # the same call through the API, and a fold overlap is refused
    shutil.copy(model / "fold_0" / "validation" / refs[0].name, model / "fold_1" / "validation" / refs[0].name)
    with pytest.raises(DatasetError, match="overlap"):
        evaluate_crossval(work, "3d_fullres", workers=1)


def test_missed_class_written_as_null_and_blank(tmp_path):
    ref = np.zeros((8, 8, 8), np.uint8)
    ref[1:4, 1:4, 1:4] = 1
    ref[5:7, 5:7, 5:7] = 2
    pred = ref.copy()
    pred[pred == 2] = 0  # class 2 missed entirely
    affine = np.diag([0.5, 0.5, 2.0, 1.0])
    for folder, arr in (("ref", ref), ("pred", pred)):
        (tmp_path / folder).mkdir()
        nib.save(nib.Nifti1Image(arr, affine), str(tmp_path / folder / "c.nii.gz"))
    summary = evaluate_folders(tmp_path / "pred", tmp_path / "ref", workers=1, json_path=tmp_path / "s.json",
                               csv_path=tmp_path / "s.csv")
    assert summary["per_class_mean"][2]["hd95_excluded"] == 1
    assert summary["mean"]["hd95"] == 0.0 and summary["mean"]["dice"] == pytest.approx(0.5)
    assert summary["cases"][0]["per_class"][1]["ref_volume_mm3"] == pytest.approx(27 * 0.5)
    saved = json.loads((tmp_path / "s.json").read_text())
    assert saved["cases"][0]["per_class"]["2"]["hd95"] is None
    assert saved["per_class_mean"]["2"]["hd95"] is None  # no finite value to average
    rows = {r["label"]: r for r in csv.DictReader((tmp_path / "s.csv").open())}
    assert rows["2"]["hd95"] == "" and rows["2"]["dice"] == "0.0"
