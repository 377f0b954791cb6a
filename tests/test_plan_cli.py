"""`medseg3d plan` end to end on the shipped hippocampus subset (CPU, a few seconds)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from medseg3d.cli import main
from medseg3d.plans import Plans
from medseg3d.preprocess import is_cached, load_case
from tests._synth import SHIPPED


def run(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out = capsys.readouterr()
    return exc.value.code, out.out + out.err


def test_plan_end_to_end_and_rerun(tmp_path, capsys):
    data = tmp_path / "hippo"
    shutil.copytree(SHIPPED, data)
    work = tmp_path / "work"
    code, out = run(["plan", str(data), "-o", str(work), "--workers", "2", "--gpu-memory", "8"], capsys)
    assert code in (0, None), out
    plans = Plans.load(work / "plans.json")
    assert set(plans.configurations) == {"2d", "3d_fullres"}
    full = plans.configuration("3d_fullres")
    assert full.spacing == (1.0, 1.0, 1.0) and full.pools_per_axis == (3, 3, 3)
    assert full.batch_size >= 2
    fp = json.loads((work / "dataset_fingerprint.json").read_text())
    assert fp["num_cases"] == 16 and len(fp["cases"]) == 16
    names = [c["name"] for c in fp["cases"]]
    assert all(is_cached(work, "3d_fullres", n) for n in names)
    d, s, props = load_case(work, "3d_fullres", names[0])
    assert d.dtype == np.float16 and s.dtype == np.int8 and set(props["class_locations"]) == {"1", "2"}

    # rerun: nothing recomputed, plans.json untouched
    mtime = (work / "plans.json").stat().st_mtime_ns
    code, out = run(["plan", str(data), "-o", str(work), "-j", "1", "--gpu-memory", "8"], capsys)
    assert code in (0, None), out
    assert "0 case(s) preprocessed, 16 already done" in out.replace("\n", " ")
    assert (work / "plans.json").stat().st_mtime_ns == mtime

    # a different budget (the same patch and topology fit) records the budget but changes nothing a
    # network depends on: the plan hash stays and the cache is kept
    code, out = run(["plan", str(data), "-o", str(work), "-j", "1", "--gpu-memory", "1"], capsys)
    assert code in (0, None), out
    assert "16 already done" in out.replace("\n", " ")
    again = Plans.load(work)
    assert again.raw["gpu_memory_gb"] == 1.0 and again.network_hash("3d_fullres") == plans.network_hash("3d_fullres")

    code, out = run(["plan", "--show", str(work)], capsys)
    assert code in (0, None) and "3d_fullres" in out and "40x56x40" in out


def test_plan_configs_and_errors(tmp_path, capsys):
    work = tmp_path / "work"
    code, out = run(["plan", str(SHIPPED), "-o", str(work), "--configs", "3d_fullres", "-j", "1"], capsys)
    assert code in (0, None), out
    assert list(Plans.load(work).configurations) == ["3d_fullres"]
    code, out = run(["plan", str(SHIPPED), "-o", str(work), "--configs", "3d_hires"], capsys)
    assert code == 2 and "3d_hires" in out and "valid" in out
    code, out = run(["plan", str(SHIPPED), "-o", str(work), "--arch", "transformer9000"], capsys)
    assert code == 2 and "transformer9000" in out and "unet" in out
    code, out = run(["plan", str(SHIPPED)], capsys)
    assert code == 2 and "-o WORK_DIR" in out
    code, out = run(["plan", "--show", str(tmp_path / "nowhere")], capsys)
    assert code == 2 and "medseg3d plan" in out
    code, out = run(["plan", str(tmp_path / "nodata"), "-o", str(work)], capsys)
    assert code == 2 and "Error" in out


def test_plan_two_channel_nnunet_layout(tmp_path, capsys):
    from tests._synth import make_nnunet

    data = make_nnunet(tmp_path / "d", n_cases=3, channels=("CT", "MR"))
    work = tmp_path / "work"
    code, out = run(["plan", str(data), "-o", str(work), "-j", "1", "--configs", "3d_fullres", "--show"], capsys)
    assert code in (0, None), out
    cfg = Plans.load(work).configuration("3d_fullres")
    assert [n["scheme"] for n in cfg.normalization] == ["ct", "zscore"]
    d, s, _ = load_case(work, "3d_fullres", "case_000")
    assert d.shape[0] == 2 and d.shape[1:] == s.shape
    assert "ct [" in out  # the table shows the CT clipping window
