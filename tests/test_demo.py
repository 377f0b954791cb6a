"""`medseg3d demo` end to end on the shipped data with a 2-iteration schedule (the README's main command)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg3d.cli import main

PACKAGE = Path(__file__).resolve().parents[1] / "medseg3d"


def run(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out = capsys.readouterr()
    return exc.value.code, out.out + out.err


def test_demo_runs_every_stage_and_rerun_reuses_the_model(tmp_path, capsys):
    out_dir = tmp_path / "demo"
    argv = ["demo", "--out", str(out_dir), "--device", "cpu", "--epochs", "1", "--iterations-per-epoch", "2"]
    code, out = run(argv, capsys)
    assert code in (0, None), out
    assert "mean foreground Dice on the 4 held-out cases" in out and "Traceback" not in out
    for stage in ("verify", "plan", "train", "predict", "evaluate"):
        assert f"{stage} " in out.split("time:")[-1]
    assert (out_dir / "work" / "plans.json").is_file()
    fold = out_dir / "work" / "results" / "3d_fullres" / "unet" / "fold_all"
    assert (fold / "checkpoint_final.pt").is_file() and (fold / "metrics.csv").is_file()
    preds = sorted(p.name for p in (out_dir / "predictions").glob("*.nii.gz"))
    assert len(preds) == 4
    summary = json.loads((out_dir / "evaluation.json").read_text())
    assert summary["num_cases"] == 4 and 0.0 <= summary["mean"]["dice"] <= 1.0
    _check_evaluation_by_hand(summary, out_dir / "predictions", PACKAGE / "resources" / "hippocampus_mini" / "labelsTs")

    mtime = (fold / "checkpoint_final.pt").stat().st_mtime_ns
    code, out = run(argv, capsys)
    assert code in (0, None), out
    assert "already holds a finished model" in " ".join(out.split())
    assert (fold / "checkpoint_final.pt").stat().st_mtime_ns == mtime


def test_demo_rejects_a_bad_device(tmp_path, capsys):
    code, out = run(["demo", "--out", str(tmp_path / "d"), "--device", "tpu"], capsys)
    assert code == 2 and "--device" in out and "Traceback" not in out


def _check_evaluation_by_hand(summary: dict, pred_dir: Path, ref_dir: Path) -> None:
    """evaluation.json against counts and Dice recomputed here from the written NIfTI files (nibabel + numpy)."""
    by_case = {c["case"]: c for c in summary["cases"]}
    assert sorted(by_case) == sorted(p.name[: -len(".nii.gz")] for p in pred_dir.glob("*.nii.gz"))
    dice: dict[int, list[float]] = {1: [], 2: []}
    for name, row in by_case.items():
        pred_img, ref_img = nib.load(pred_dir / f"{name}.nii.gz"), nib.load(ref_dir / f"{name}.nii.gz")
        assert pred_img.shape == ref_img.shape and np.allclose(pred_img.affine, ref_img.affine, atol=1e-4), name
        pred, ref = np.asarray(pred_img.dataobj).astype(int), np.asarray(ref_img.dataobj).astype(int)
        assert set(np.unique(pred)) <= {0, 1, 2}
        for c in (1, 2):
            p, r = pred == c, ref == c
            tp, fp, fn = int((p & r).sum()), int((p & ~r).sum()), int((~p & r).sum())
            d = 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)
            got = row["per_class"][str(c)]
            assert (got["tp"], got["fp"], got["fn"]) == (tp, fp, fn), (name, c)
            assert got["dice"] == pytest.approx(d, abs=1e-9), (name, c)
            dice[c].append(d)
    for c in (1, 2):
        assert summary["per_class_mean"][str(c)]["dice"] == pytest.approx(np.mean(dice[c]), abs=1e-9)
    assert summary["mean"]["dice"] == pytest.approx(np.mean([np.mean(dice[1]), np.mean(dice[2])]), abs=1e-9)


def test_the_demo_library_does_not_import_the_commands():
    """Imports run down the data flow: `medseg3d.commands` uses the library, never the reverse."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "commands" or rel == Path("cli.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{rel}: {n}" for n in names if n == "medseg3d.commands" or n.startswith("medseg3d.commands.")]
    assert offenders == []
