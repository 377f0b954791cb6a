"""A bad case never stops a folder: predict, evaluate, evaluate --model and the final validation.

Each per-case problem (wrong channels, an unreadable file, a missing channel file, a prediction of
another shape or without a reference, a case whose prediction raises) is collected and reported at
the end, by case, while the good cases are written; the command exits 2.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medseg3d.cli import main
from medseg3d.errors import CasesFailedError, InputError
from medseg3d.evaluation.crossval import evaluate_crossval
from medseg3d.evaluation.evaluate import EvaluationError, evaluate_folders
from medseg3d.evaluation.metrics import case_metrics, dice_per_class
from medseg3d.inference.folder import PredictionError, predict_folder
from medseg3d.plans.schema import Plans
from medseg3d.training.validation import final_validation
from tests._synth import SHIPPED, plan_shipped, pointwise_model

torch.set_num_threads(1)
IMAGES = SHIPPED / "imagesTs"  # 4 unlabelled cases
LABELS = SHIPPED / "labelsTr"




@pytest.fixture(scope="module")
def work_dir(tmp_path_factory) -> Path:
    return plan_shipped(tmp_path_factory)


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_one_image_with_the_wrong_channels_does_not_stop_the_folder(work_dir, tmp_path):
    inp = shutil.copytree(IMAGES, tmp_path / "in")
    victim = sorted(inp.glob("*.nii.gz"))[2]
    img = nib.load(victim)
    two = np.stack([np.asarray(img.dataobj)] * 2, -1).astype(np.float32)
    nib.save(nib.Nifti1Image(two, img.affine), victim)  # a 2-channel image for a 1-channel model
    (inp / "broken.nii.gz").write_bytes(b"not a nifti file")  # unreadable
    with pytest.raises(PredictionError) as err:
        predict_folder(work_dir, inp, tmp_path / "out", models=[pointwise_model()], use_mirroring=False)
    failed = dict(err.value.failed)
    name = victim.name[:-7]
    assert set(failed) == {name, "broken"} and "2 channel" in failed[name]
    assert "2 of 5" in str(err.value)
    good = sorted(p.name for p in inp.glob("*.nii.gz") if p not in (victim, inp / "broken.nii.gz"))
    assert _names(tmp_path / "out") == good and len(good) == 3  # and no temporary file left


def test_a_case_missing_a_channel_file_does_not_stop_the_others(work_dir, tmp_path):
    raw = json.loads((work_dir / "plans.json").read_text())
    raw["channel_names"] = ["T1", "T2"]
    for c in raw["configurations"].values():
        c["normalization"] = c["normalization"] * 2
    wd = tmp_path / "wd"
    wd.mkdir()
    Plans(raw).save(wd / "plans.json")
    inp = tmp_path / "in"
    inp.mkdir()
    src = nib.load(IMAGES / "hippocampus_314.nii.gz")
    for name, channels in (("a", (0, 1)), ("b", (0,))):
        for ch in channels:
            nib.save(src, inp / f"{name}_{ch:04d}.nii.gz")
    with pytest.raises(PredictionError) as err:
        predict_folder(wd, inp, tmp_path / "o", models=[pointwise_model()], use_mirroring=False)
    assert [n for n, _ in err.value.failed] == ["b"] and "channel files [0]" in err.value.failed[0][1]
    assert err.value.summary.predicted == ["a"] and _names(tmp_path / "o") == ["a.nii.gz"]


def test_num_parts_report_a_bad_case_in_exactly_one_part(work_dir, tmp_path):
    inp = shutil.copytree(IMAGES, tmp_path / "in")
    (inp / "broken.nii.gz").write_bytes(b"garbage")
    failed = []
    for part in range(2):
        try:
            predict_folder(work_dir, inp, tmp_path / f"o{part}", models=[pointwise_model()], use_mirroring=False,
                           num_parts=2, part_id=part)
        except PredictionError as exc:
            failed += [n for n, _ in exc.failed]
    assert failed == ["broken"]


def test_cli_predict_exits_2_naming_the_bad_case_and_writes_the_others(work_dir, tmp_path, capsys, monkeypatch):
    from medseg3d.inference import folder

    monkeypatch.setattr(folder, "load_fold_models", lambda *a, **k: [pointwise_model()])
    inp = shutil.copytree(IMAGES, tmp_path / "in")
    victim = min(inp.glob("*.nii.gz"))
    img = nib.load(victim)
    nib.save(nib.Nifti1Image(np.stack([np.asarray(img.dataobj)] * 3, -1).astype(np.float32), img.affine), victim)
    with pytest.raises(SystemExit) as ex:
        main(["predict", "-m", str(work_dir), "-i", str(inp), "-o", str(tmp_path / "out"), "--no-tta"])
    err = capsys.readouterr().err
    assert ex.value.code == 2 and "Traceback" not in err
    assert f"case {victim.name[:-7]}" in err and "3 channel" in err and "1 of 4" in err
    assert len(_names(tmp_path / "out")) == 3


def _label_copy(src: Path, dst: Path, data: np.ndarray | None = None) -> None:
    img = nib.load(str(src))
    arr = np.asarray(img.dataobj) if data is None else data
    nib.save(nib.Nifti1Image(arr, img.affine), str(dst))


def test_evaluate_reports_bad_predictions_and_scores_the_others(tmp_path, capsys):
    refs = sorted(LABELS.glob("*.nii.gz"))[:3]
    pred = tmp_path / "pred"
    pred.mkdir()
    for ref in refs[:2]:
        _label_copy(ref, pred / ref.name)
    _label_copy(refs[2], pred / refs[2].name, data=np.zeros((5, 5, 5), np.uint8))  # another shape
    _label_copy(refs[0], pred / "stranger.nii.gz")  # no reference
    (pred / "corrupt.nii.gz").write_bytes(b"\x1f\x8b broken")  # unreadable, and no reference either
    out_json = tmp_path / "m.json"
    with pytest.raises(SystemExit) as ex:
        main(["evaluate", str(pred), str(LABELS), "--json", str(out_json), "--workers", "1"])
    captured = capsys.readouterr()
    assert ex.value.code == 2 and "Traceback" not in captured.err
    assert "3 of 5 case(s) failed" in captured.err
    for name in (refs[2].name[:-7], "stranger", "corrupt"):
        assert f"case {name}" in captured.err
    assert "shape" in captured.err and "no reference" in captured.err
    assert "mean" in captured.out  # the table of the good cases is still printed
    saved = json.loads(out_json.read_text())
    assert [c["case"] for c in saved["cases"]] == [r.name[:-7] for r in refs[:2]]
    assert saved["mean"]["dice"] == pytest.approx(1.0)
    assert sorted(f["case"] for f in saved["failed"]) == sorted([refs[2].name[:-7], "stranger", "corrupt"])


def test_evaluate_unreadable_prediction_with_a_reference(tmp_path):
    refs = sorted(LABELS.glob("*.nii.gz"))[:2]
    pred = tmp_path / "pred"
    pred.mkdir()
    _label_copy(refs[0], pred / refs[0].name)
    (pred / refs[1].name).write_bytes(b"\x1f\x8b broken")
    with pytest.raises(EvaluationError) as err:
        evaluate_folders(pred, LABELS, workers=1)
    assert [n for n, _ in err.value.failed] == [refs[1].name[:-7]]
    assert err.value.summary["num_cases"] == 1


def test_crossval_reports_a_bad_fold_prediction_and_summarises_the_others(work_dir, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(work_dir / "plans.json", work / "plans.json")
    refs = sorted(LABELS.glob("*.nii.gz"))[:4]
    model = work / "results" / "3d_fullres" / "unet"
    for fold, chunk in ((0, refs[:2]), (1, refs[2:])):
        val = model / f"fold_{fold}" / "validation"
        val.mkdir(parents=True)
        for ref in chunk:
            _label_copy(ref, val / ref.name)
    _label_copy(refs[3], model / "fold_1" / "validation" / refs[3].name, data=np.zeros((4, 4, 4), np.uint8))
    with pytest.raises(EvaluationError) as err:
        evaluate_crossval(work, "3d_fullres", workers=1)
    assert [n for n, _ in err.value.failed] == [refs[3].name[:-7]]
    summary = json.loads((model / "crossval_summary.json").read_text())
    assert summary["num_cases"] == 3 and [f["case"] for f in summary["failed"]] == [refs[3].name[:-7]]
    assert not (model / "postprocessing.json").exists()  # chosen only on every case


def test_final_validation_reports_a_failing_case_and_validates_the_others(work_dir, tmp_path, monkeypatch):
    from medseg3d.inference import predictor

    plans = Plans.load(work_dir)
    cases = [p.name[:-7] for p in sorted(LABELS.glob("*.nii.gz"))[:3]]
    real = predictor.predict_case

    def predict_or_fail(models, image, plans, config_name, **kw):
        if kw.get("case") == cases[1]:
            raise InputError(f"case {cases[1]}: the image holds NaN")
        return real(models, image, plans, config_name, **kw)

    monkeypatch.setattr(predictor, "predict_case", predict_or_fail)
    out = tmp_path / "validation"
    with pytest.raises(CasesFailedError) as err:
        final_validation(pointwise_model(), work_dir, plans, "3d_fullres", cases, out, torch.device("cpu"), mirroring=False)
    assert [n for n, _ in err.value.failed] == [cases[1]] and "NaN" in err.value.failed[0][1]
    summary = json.loads((out / "summary.json").read_text())
    assert [c["case"] for c in summary["cases"]] == [cases[0], cases[2]]
    assert summary["failed"][0]["case"] == cases[1]
    assert _names(out) == sorted([f"{cases[0]}.nii.gz", f"{cases[2]}.nii.gz", "summary.json"])
    # the final validation's Dice is `medseg3d evaluate`'s Dice of the written predictions
    refs = tmp_path / "refs"
    refs.mkdir()
    for c in (cases[0], cases[2]):
        shutil.copy(LABELS / f"{c}.nii.gz", refs / f"{c}.nii.gz")
    (out / "summary.json").unlink()
    evaluated = evaluate_folders(out, refs, [1, 2], workers=1)
    for case, row in zip(summary["cases"], evaluated["cases"]):
        for c in ("1", "2"):
            assert case["dice"][c] == pytest.approx(row["per_class"][int(c)]["dice"], abs=1e-12)


@pytest.mark.parametrize(("ref_classes", "pred_classes"), [((), ()), ((1,), ()), ((), (2,)), ((1, 2), (2,))])
def test_dice_per_class_is_the_evaluation_dice_with_its_empty_mask_rule(ref_classes, pred_classes):
    ref = np.zeros((6, 6, 6), np.uint8)
    pred = np.zeros_like(ref)
    for c in ref_classes:
        ref[c:c + 2, :3, :3] = c
    for c in pred_classes:
        pred[c:c + 3, :3, :3] = c
    dice = dice_per_class(ref, pred, [1, 2])
    metrics = case_metrics(ref, pred, (1.0, 1.0, 1.0), [1, 2])["per_class"]
    assert dice == {c: metrics[c]["dice"] for c in (1, 2)}
    if not ref_classes and not pred_classes:
        assert dice == {1: 1.0, 2: 1.0}  # absent from both: 1, as docs/evaluation.md says
