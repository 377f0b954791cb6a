"""`medseg3d verify` on valid data and on a corpus of malformed datasets built here."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from medseg3d.cli import main
from tests._synth import SHIPPED, make_msd, make_nnunet, save


def run(args, capsys):
    with pytest.raises(SystemExit) as info:
        main(args)
    out = capsys.readouterr()
    return info.value.code, out.out + out.err


def msd(tmp_path):
    return make_msd(tmp_path / "ds", n_cases=3)


def _edit_json(root, fn):
    meta = json.loads((root / "dataset.json").read_text())
    fn(meta)
    (root / "dataset.json").write_text(json.dumps(meta))


def corrupt_missing_json(root):
    (root / "dataset.json").unlink()
    return [("dataset.json is missing", None)]


def corrupt_bad_json(root):
    (root / "dataset.json").write_text("{ not json")
    return [("not valid JSON", None)]


def corrupt_missing_label(root):
    (root / "labelsTr" / "case_001.nii.gz").unlink()
    return [("no label", "case_001")]


def corrupt_orphan_label(root):
    save(np.zeros((20, 24, 16), np.uint8), root / "labelsTr" / "case_999.nii.gz")
    return [("no image", "case_999")]


def corrupt_shape(root):
    save(np.zeros((20, 24, 15), np.uint8), root / "labelsTr" / "case_000.nii.gz")
    return [("shape", "case_000")]


def corrupt_spacing(root):
    save(nib.load(str(root / "labelsTr" / "case_001.nii.gz")).get_fdata().astype(np.uint8),
         root / "labelsTr" / "case_001.nii.gz", np.diag([1.0, 1.0, 2.0, 1.0]))
    return [("spacing", "case_001")]


def corrupt_origin(root):
    affine = np.eye(4)
    affine[:3, 3] = [5, 0, 0]
    save(np.asarray(nib.load(str(root / "labelsTr" / "case_002.nii.gz")).dataobj), root / "labelsTr" / "case_002.nii.gz", affine)
    return [("origin", "case_002")]


def corrupt_direction(root):
    save(np.asarray(nib.load(str(root / "labelsTr" / "case_000.nii.gz")).dataobj), root / "labelsTr" / "case_000.nii.gz", np.diag([-1.0, 1, 1, 1]))
    return [("orientation", "case_000")]


def corrupt_undeclared_label(root):
    lab = np.asarray(nib.load(str(root / "labelsTr" / "case_001.nii.gz")).dataobj).copy()
    lab[0, 0, 0] = 7
    save(lab, root / "labelsTr" / "case_001.nii.gz")
    return [("not declared", "case_001")]


def corrupt_float_label(root):
    save(np.full((20, 24, 16), 0.5, np.float32), root / "labelsTr" / "case_002.nii.gz")
    return [("non-integer", "case_002")]


def corrupt_nan(root):
    img = np.asarray(nib.load(str(root / "imagesTr" / "case_000.nii.gz")).dataobj).copy()
    img[1, 2, 3] = np.nan
    img[2, 2, 3] = np.inf
    save(img, root / "imagesTr" / "case_000.nii.gz")
    return [("NaN or Inf", "case_000")]


def corrupt_truncated_gzip(root):
    path = root / "imagesTr" / "case_001.nii.gz"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    return [("unreadable", "case_001")]


def corrupt_not_nifti(root):
    with gzip.open(root / "imagesTr" / "case_002.nii.gz", "wt") as fh:
        fh.write("this is a CSV, not an image\n" * 100)
    return [("unreadable", "case_002")]


def corrupt_channels(root):
    save(np.zeros((20, 24, 16, 2), np.float32), root / "imagesTr" / "case_000.nii.gz")
    return [("channel", "case_000")]


def corrupt_labels_not_consecutive(root):
    _edit_json(root, lambda m: m.update(labels={"0": "background", "1": "a", "3": "b"}))
    return [("not consecutive", None)]


def corrupt_mixed_dims(root):
    save(np.zeros((20, 24), np.float32), root / "imagesTr" / "case_002.nii.gz")
    save(np.zeros((20, 24), np.uint8), root / "labelsTr" / "case_002.nii.gz")
    return [("dimensionalities", None)]


CORRUPTIONS = [corrupt_missing_json, corrupt_bad_json, corrupt_missing_label, corrupt_orphan_label, corrupt_shape,
               corrupt_spacing, corrupt_origin, corrupt_direction, corrupt_undeclared_label, corrupt_float_label,
               corrupt_nan, corrupt_truncated_gzip, corrupt_not_nifti, corrupt_channels, corrupt_labels_not_consecutive,
               corrupt_mixed_dims]


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__)
def test_malformed_dataset_is_rejected_with_named_problem(tmp_path, capsys, corrupt):
    root = msd(tmp_path)
    expected = corrupt(root)
    code, text = run(["verify", str(root)], capsys)
    assert code == 2
    assert "Traceback" not in text
    assert "Fix:" in text
    for what, case in expected:
        assert what in text
        if case:
            assert f"case {case}" in text


def test_several_problems_are_all_reported(tmp_path, capsys):
    root = msd(tmp_path)
    (root / "labelsTr" / "case_001.nii.gz").unlink()
    corrupt_nan(root)
    corrupt_float_label(root)
    code, text = run(["verify", str(root)], capsys)
    assert code == 2
    assert "3 problems" in text
    for case in ("case_000", "case_001", "case_002"):
        assert f"case {case}" in text


def test_nnunet_layout_problems_are_named(tmp_path, capsys):
    root = make_nnunet(tmp_path / "nn", n_cases=2)
    save(np.zeros((20, 24, 16), np.float32), root / "imagesTr" / "case_000_0005.nii.gz")
    save(np.zeros((20, 24, 16), np.float32), root / "imagesTr" / "stray.nii.gz")
    code, text = run(["verify", str(root)], capsys)
    assert code == 2 and "beyond the 2 declared" in text and "_XXXX channel suffix" in text


def test_valid_datasets_pass_with_a_summary(tmp_path, capsys):
    code, text = run(["verify", str(make_nnunet(tmp_path / "nn", n_cases=2))], capsys)
    assert code == 0 and "valid" in text and "CT" in text
    code, text = run(["verify", str(SHIPPED)], capsys)
    assert code == 0 and "16" in text and "Anterior" in text and "(1.0, 1.0, 1.0)" in text


def test_subprocess_exit_code_and_no_traceback(tmp_path):
    root = msd(tmp_path)
    corrupt_truncated_gzip(root)
    proc = subprocess.run([sys.executable, "-m", "medseg3d", "verify", str(root)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "case_001" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "medseg3d", "verify", str(root), "--debug"], capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" in proc.stderr
