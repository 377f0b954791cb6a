"""The dataset fingerprint on synthetic data and on the shipped hippocampus subset."""

from __future__ import annotations

import numpy as np
import pytest

from medseg3d.fingerprint import compute_fingerprint, intensity_stats
from medseg3d.io import load_dataset, read_label, read_volume
from tests._synth import SHIPPED, make_msd, make_nnunet, save


def test_fingerprint_synthetic_counts_and_stats(tmp_path):
    root = make_msd(tmp_path / "d", n_cases=3, shape=(20, 24, 16))
    # zero border on one case: its crop shrinks
    img = read_volume(root / "imagesTr" / "case_000.nii.gz").array[0]
    img[:3] = 0
    save(img, root / "imagesTr" / "case_000.nii.gz")
    spec = load_dataset(root)
    fp = compute_fingerprint(spec, workers=1)
    assert fp["num_cases"] == 3 and fp["channel_names"] == ["MRI"]
    c0 = fp["cases"][0]
    assert c0["shape"] == [20, 24, 16] and c0["shape_after_crop"] == [17, 24, 16]
    assert fp["spacings"] == [[1.0, 1.0, 1.0]] * 3
    lab = read_label(root / "labelsTr" / "case_001.nii.gz").array[0]
    assert fp["cases"][1]["class_voxels"] == {str(v): int((lab == v).sum()) for v in np.unique(lab)}
    # pooled foreground intensities equal the stats computed directly (every voxel is sampled here)
    fg = []
    for case in spec.cases:
        im, lb = read_volume(case.images).array[0], read_label(case.label).array[0]
        fg.append(im[lb > 0])
    direct = intensity_stats(np.concatenate(fg).astype(np.float64))
    got = fp["foreground_intensity_properties_per_channel"]["0"]
    for k in ("mean", "std", "median", "min", "max", "percentile_00_5", "percentile_99_5"):
        assert got[k] == pytest.approx(direct[k], rel=1e-4)


def test_fingerprint_two_channels_parallel(tmp_path):
    spec = load_dataset(make_nnunet(tmp_path / "d", n_cases=4, channels=("CT", "MR")))
    fp1 = compute_fingerprint(spec, workers=1)
    fp2 = compute_fingerprint(spec, workers=2)
    assert fp1 == fp2  # seeded sampling: parallel gives the same fingerprint
    assert set(fp1["foreground_intensity_properties_per_channel"]) == {"0", "1"}


def test_fingerprint_shipped_hippocampus():
    fp = compute_fingerprint(load_dataset(SHIPPED), workers=1)
    assert fp["num_cases"] == 16
    med = np.median(fp["spacings"], 0)
    assert np.allclose(med, 1.0)
    st = fp["foreground_intensity_properties_per_channel"]["0"]
    assert st["percentile_00_5"] <= st["median"] <= st["percentile_99_5"]
    assert all(set(c["class_voxels"]) == {"0", "1", "2"} for c in fp["cases"])
