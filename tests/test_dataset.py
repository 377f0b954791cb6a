"""Dataset discovery in both layouts and the inputs of predict."""

from __future__ import annotations

import numpy as np
import pytest

from medseg3d.errors import DatasetError, InputError
from medseg3d.io import find_input_cases, load_dataset, read_volume
from tests._synth import SHIPPED, make_msd, make_nnunet, save


def test_msd_layout_is_read_as_is(tmp_path):
    spec = load_dataset(make_msd(tmp_path / "msd", n_cases=3, channels=("T1", "T2")))
    assert spec.layout == "msd"
    assert spec.channel_names == ["T1", "T2"]
    assert spec.labels == {0: "background", 1: "a", 2: "b"}
    assert [c.name for c in spec.cases] == ["case_000", "case_001", "case_002"]
    assert read_volume(spec.cases[0].images).array.shape[0] == 2


def test_nnunet_layout_is_read_as_is(tmp_path):
    spec = load_dataset(make_nnunet(tmp_path / "nn", n_cases=2))
    assert spec.layout == "nnunet"
    assert spec.channel_names == ["CT", "MR"]
    assert spec.num_classes == 3
    assert [p.name for p in spec.cases[1].images] == ["case_001_0000.nii.gz", "case_001_0001.nii.gz"]
    assert spec.cases[1].label.name == "case_001.nii.gz"


def test_shipped_data_has_train_and_labelled_test_cases():
    spec = load_dataset(SHIPPED)
    assert len(spec.cases) == 16 and len(spec.test_cases) == 4
    assert all(c.label is not None and c.label.is_file() for c in spec.test_cases)


def test_structural_problems_are_all_listed(tmp_path):
    root = make_nnunet(tmp_path / "nn", n_cases=3)
    (root / "imagesTr" / "case_001_0001.nii.gz").unlink()
    (root / "labelsTr" / "case_002.nii.gz").unlink()
    with pytest.raises(DatasetError) as info:
        load_dataset(root)
    text = str(info.value)
    assert "case_001" in text and "channel 1" in text
    assert "case_002" in text and "no label" in text
    assert "numTraining" in text


def test_find_inputs_in_both_namings_and_single_file(tmp_path):
    data = np.zeros((4, 4, 4), np.float32)
    for name in ("a_0000", "a_0001", "b_0000", "b_0001"):
        save(data, tmp_path / "nn" / f"{name}.nii.gz")
    cases = find_input_cases(tmp_path / "nn", num_channels=2)
    assert [c.name for c in cases] == ["a", "b"] and len(cases[0].images) == 2
    save(np.zeros((4, 4, 4, 2), np.float32), tmp_path / "msd" / "c.nii.gz")
    assert [c.name for c in find_input_cases(tmp_path / "msd", num_channels=2)] == ["c"]
    single = find_input_cases(tmp_path / "nn" / "a_0000.nii.gz", num_channels=2)
    assert single[0].name == "a" and len(single[0].images) == 2
    with pytest.raises(InputError, match="channel"):
        find_input_cases(tmp_path / "msd", num_channels=1)
    (tmp_path / "nn" / "b_0001.nii.gz").unlink()
    with pytest.raises(InputError, match="case b"):
        find_input_cases(tmp_path / "nn", num_channels=2)
