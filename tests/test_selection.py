"""Model selection end to end on the shipped data: `train --save-probabilities/--validation-only`,
`find-best`, `ensemble`, `predict --best` and `evaluate --overlays`.

One WORK_DIR (module fixture): 2d and 3d_fullres, folds 0 and 1, tiny networks trained for one
iteration; 3d_fullres fold 1 first without probabilities (so find-best must score it alone), then
revalidated with `--validation-only --save-probabilities`. Every score is recomputed here with
numpy from the files on disk.
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
from medseg3d.postprocess import apply_postprocessing
from tests._synth import SHIPPED

torch.set_num_threads(1)
CONFIGS = ("2d", "3d_fullres")
FOLDS = (0, 1)
TINY = ["--features", "4,8,8,8", "--epochs", "1", "--iterations-per-epoch", "1", "--val-iterations", "0",
        "--batch-size", "2", "--device", "cpu", "--num-workers", "0", "--no-amp", "--no-val-tta", "--optimizer",
        "adamw", "--lr", "1e-3"]


def cli(argv: list[str], capsys=None) -> tuple[int, str]:
    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = 0 if exc.code is None else int(exc.code)
    out = "" if capsys is None else "".join(capsys.readouterr())
    return code, out


def val_dir(wd: Path, config: str, fold: int) -> Path:
    return wd / "results" / config / "unet" / f"fold_{fold}" / "validation"


def labels_of(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def np_dice(ref: np.ndarray, pred: np.ndarray, c: int) -> float:
    a, b = ref == c, pred == c
    den = int(a.sum() + b.sum())
    return 1.0 if den == 0 else 2.0 * float((a & b).sum()) / den


def np_ensemble(paths: list[Path]) -> np.ndarray:
    maps = [np.load(p)["probabilities"] for p in paths]
    return np.argmax((maps[0] + maps[1]) / np.float32(2), axis=0).astype(np.uint8)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The trained WORK_DIR and find-best's selection while 3d_fullres fold 1 had no probabilities."""
    wd = tmp_path_factory.mktemp("sel") / "wd"
    assert cli(["plan", str(SHIPPED), "-o", str(wd), "-j", "1", "--configs", ",".join(CONFIGS)])[0] == 0
    for config in CONFIGS:
        for fold in FOLDS:
            probs = [] if (config, fold) == ("3d_fullres", 1) else ["--save-probabilities"]
            code, _ = cli(["train", str(wd), "--config", config, "--fold", str(fold), *TINY, *probs])
            assert code == 0, (config, fold)
    assert cli(["find-best", str(wd), "--folds", "0,1"])[0] == 0
    without = json.loads((wd / "selection.json").read_text())
    code, _ = cli(["train", str(wd), "--config", "3d_fullres", "--fold", "1", "--validation-only",
                   "--save-probabilities", "--no-val-tta", "--device", "cpu"])
    assert code == 0
    return wd, without


def test_validation_only_writes_probabilities_of_the_same_predictions(work):
    wd, _ = work
    val = val_dir(wd, "3d_fullres", 1)
    summary = json.loads((val / "summary.json").read_text())
    assert summary["probabilities"] is True and summary["mirroring"] is False and summary["step"] == 0.5
    cases = [c["case"] for c in summary["cases"]]
    assert cases and sorted(p.name[:-4] for p in val.glob("*.npz")) == sorted(cases)
    for case in cases:
        probs = np.load(val / f"{case}.npz")["probabilities"]
        seg = labels_of(val / f"{case}.nii.gz")
        assert probs.dtype == np.float32 and probs.shape == (3, *seg.shape)
        np.testing.assert_allclose(probs.sum(0), 1, atol=1e-4)


def test_without_probabilities_a_model_is_scored_alone(work):
    _, without = work
    names = [c["name"] for c in without["candidates"]]
    assert sorted(names) == ["2d/unet", "3d_fullres/unet"]
    assert any("3d_fullres/unet: no probabilities" in m and "--validation-only --save-probabilities" in m
               for m in without["missing"])


def test_find_best_scores_equal_a_numpy_recomputation(work, capsys):
    wd, _ = work
    code, out = cli(["find-best", str(wd), "--folds", "0,1"], capsys)
    assert code == 0, out
    sel = json.loads((wd / "selection.json").read_text())
    assert sel["folds"] == [0, 1] and sel["labels"] == {"1": "Anterior", "2": "Posterior"}
    refs = SHIPPED / "labelsTr"
    cases = {}
    for fold in FOLDS:
        cases.update({p.name[:-7]: fold for p in val_dir(wd, "2d", fold).glob("*.nii.gz")})
    assert sorted(sel["cases"]) == sorted(cases) and len(cases) >= 4
    by_name = {c["name"]: c for c in sel["candidates"]}
    assert sorted(by_name) == ["2d/unet", "2d/unet + 3d_fullres/unet", "3d_fullres/unet"]
    for name, cand in by_name.items():
        per_class = {1: [], 2: []}
        for case, fold in cases.items():
            ref = labels_of(refs / f"{case}.nii.gz")
            if "+" in name:
                pred = np_ensemble([val_dir(wd, c, fold) / f"{case}.npz" for c in CONFIGS])
            else:
                pred = labels_of(val_dir(wd, name.split("/")[0], fold) / f"{case}.nii.gz")
            for c in (1, 2):
                per_class[c].append(np_dice(ref, pred, c))
                assert cand["case_dice"][case][str(c)] == pytest.approx(per_class[c][-1], abs=1e-12)
        for c in (1, 2):
            assert cand["per_class_dice"][str(c)] == pytest.approx(np.mean(per_class[c]), abs=1e-12)
        assert cand["mean_dice"] == pytest.approx(np.mean([np.mean(per_class[1]), np.mean(per_class[2])]), abs=1e-12)
    best = max(sel["candidates"], key=lambda c: c["mean_dice"])
    assert sel["winner"]["mean_dice"] == best["mean_dice"] and sel["candidates"][0]["rank"] == 1
    assert sel["winner"]["mean_dice_postprocessed"] >= sel["winner"]["mean_dice"] - 1e-12
    report = (wd / "selection.md").read_text()
    assert "| rank | candidate | Anterior | Posterior | mean Dice |" in report and sel["winner"]["name"] in report
    pngs = [wd / "selection" / "dice_per_class.png", *sorted((wd / "selection" / "overlays").glob("*.png"))]
    assert len(pngs) == 4 and all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs)
    assert "winner:" in out and "2d/unet + 3d_fullres/unet" in out


def test_missing_folds_are_named_with_the_command_and_no_candidate_exits_2(work, capsys):
    wd, _ = work
    code, out = cli(["find-best", str(wd), "--folds", "0,1,2", "--configs", "2d"], capsys)
    assert code == 2 and "fold 2 is not trained" in out and "--fold 2" in out and "Traceback" not in out
    code, out = cli(["find-best", str(wd), "--folds", "0", "--configs", "2d", "--no-ensembles"], capsys)
    assert code == 0 and "3d_fullres" not in json.loads((wd / "selection.json").read_text())["winner"]["name"]
    assert cli(["find-best", str(wd), "--folds", "0,1"])[0] == 0  # the selection the other tests read


def _fold0_selection(wd: Path, tmp: Path, members: list[str], decision: dict) -> Path:
    """A copy of WORK_DIR whose selection.json names `members`, fold 0 only, with `decision`."""
    copy = tmp / "wd"
    shutil.copytree(wd, copy)
    sel = json.loads((wd / "selection.json").read_text())
    sel["folds"] = [0]
    step = {"step": 0.5, "mirroring": False, "checkpoint": "final"}
    sel["winner"] = {**sel["winner"], "name": " + ".join(members), "postprocessing": decision,
                     "members": [{"configuration": m.split("/")[0], "architecture": "unet", **step} for m in members]}
    (copy / "selection.json").write_text(json.dumps(sel))
    return copy


@pytest.mark.parametrize("members", [["2d/unet"], ["2d/unet", "3d_fullres/unet"]], ids=["single", "ensemble"])
def test_predict_best_reproduces_the_validation_bit_for_bit(work, tmp_path, members, capsys):
    wd, _ = work
    decision = {"largest_component_foreground": True, "largest_component_classes": [1], "dice_before": 0.0,
                "dice_after": 0.0}
    copy = _fold0_selection(wd, tmp_path, members, decision)
    cases = sorted(p.name[:-7] for p in val_dir(wd, "2d", 0).glob("*.nii.gz"))
    images = tmp_path / "images"
    images.mkdir()
    for case in cases:
        shutil.copy(SHIPPED / "imagesTr" / f"{case}.nii.gz", images)
    code, out = cli(["predict", "-m", str(copy), "--best", "-i", str(images), "-o", str(tmp_path / "out"),
                     "--device", "cpu"], capsys)
    assert code == 0, out
    for case in cases:
        if len(members) == 1:
            expected = labels_of(val_dir(wd, "2d", 0) / f"{case}.nii.gz")
        else:
            expected = np_ensemble([val_dir(wd, c, 0) / f"{case}.npz" for c in CONFIGS])
        got = nib.load(str(tmp_path / "out" / f"{case}.nii.gz"))
        np.testing.assert_array_equal(np.asarray(got.dataobj), apply_postprocessing(expected, decision))
        assert np.array_equal(got.affine, nib.load(str(images / f"{case}.nii.gz")).affine)


def test_ensemble_matches_a_numpy_average_and_reports_a_bad_case(work, tmp_path, capsys):
    wd, _ = work
    dirs = [val_dir(wd, c, 0) for c in CONFIGS]
    cases = sorted(p.name[:-4] for p in dirs[0].glob("*.npz"))
    broken = tmp_path / "broken"
    shutil.copytree(dirs[1], broken)
    (broken / f"{cases[0]}.npz").write_bytes(b"not a zip")
    out_dir = tmp_path / "ens"
    code, out = cli(["ensemble", str(dirs[0]), str(broken), "-o", str(out_dir)], capsys)
    assert code == 2 and f"case {cases[0]}" in out and "not a readable .npz" in out and "Traceback" not in out
    assert sorted(p.name[:-7] for p in out_dir.glob("*.nii.gz")) == cases[1:]
    for case in cases[1:]:
        got = nib.load(str(out_dir / f"{case}.nii.gz"))
        np.testing.assert_array_equal(np.asarray(got.dataobj), np_ensemble([d / f"{case}.npz" for d in dirs]))
        src = nib.load(str(dirs[0] / f"{case}.nii.gz"))
        assert np.array_equal(got.affine, src.affine) and got.header.get_sform(coded=True)[1] == \
            src.header.get_sform(coded=True)[1]


def test_evaluate_writes_overlays_of_the_worst_cases(work, tmp_path, capsys):
    wd, _ = work
    code, out = cli(["evaluate", str(val_dir(wd, "2d", 0)), str(SHIPPED / "labelsTr"), "--overlays",
                     str(tmp_path / "ov"), "-j", "1"], capsys)
    assert code == 0, out
    pngs = sorted((tmp_path / "ov").glob("*.png"))
    assert len(pngs) == 3 and all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs)
