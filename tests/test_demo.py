"""`medseg3d demo` end to end on the shipped data with a 2-iteration schedule (the README's main command)."""

from __future__ import annotations

import json

import pytest

from medseg3d.cli import main


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

    mtime = (fold / "checkpoint_final.pt").stat().st_mtime_ns
    code, out = run(argv, capsys)
    assert code in (0, None), out
    assert "already holds a finished model" in " ".join(out.split())
    assert (fold / "checkpoint_final.pt").stat().st_mtime_ns == mtime


def test_demo_rejects_a_bad_device(tmp_path, capsys):
    code, out = run(["demo", "--out", str(tmp_path / "d"), "--device", "tpu"], capsys)
    assert code == 2 and "--device" in out and "Traceback" not in out
