"""Volume reading/writing: exact geometry through nibabel and SimpleITK, channels, labels."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medseg3d.errors import InputError, OutputExistsError
from medseg3d.io import Volume, read_header, read_label, read_volume, write_volume
from tests._synth import save


def oblique_lps_affine() -> np.ndarray:
    """A non-RAS (LPS-like flips), oblique (rotated) affine with anisotropic spacing."""
    angle = np.deg2rad(17.0)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    flips = np.diag([-1.0, -1.0, 1.0])
    affine = np.eye(4)
    affine[:3, :3] = rot @ flips @ np.diag([0.7, 0.8, 2.5])
    affine[:3, 3] = [12.5, -30.25, 7.0]
    return affine


def test_round_trip_keeps_geometry_through_both_readers(tmp_path):
    affine = oblique_lps_affine()
    data = np.random.default_rng(0).normal(size=(9, 8, 7)).astype(np.float32)
    src = save(data, tmp_path / "src.nii.gz", affine)
    vol = read_volume(src)
    assert vol.array.shape == (1, 9, 8, 7)
    np.testing.assert_allclose(vol.spacing, (0.7, 0.8, 2.5), rtol=1e-6)
    out = tmp_path / "out.nii.gz"
    write_volume(vol.with_array(vol.array), out)
    a, b = nib.load(str(src)), nib.load(str(out))
    np.testing.assert_array_equal(a.affine, b.affine)
    assert a.header.get_sform(coded=True)[1] == b.header.get_sform(coded=True)[1]
    assert a.header.get_qform(coded=True)[1] == b.header.get_qform(coded=True)[1]
    np.testing.assert_array_equal(np.asarray(b.dataobj), data)
    sa, sb = sitk.ReadImage(str(src)), sitk.ReadImage(str(out))
    assert sa.GetOrigin() == sb.GetOrigin()
    assert sa.GetSpacing() == sb.GetSpacing()
    assert sa.GetDirection() == sb.GetDirection()


def test_label_written_with_integer_type_and_same_header(tmp_path):
    affine = oblique_lps_affine()
    save(np.zeros((5, 6, 7), np.float32), tmp_path / "img.nii.gz", affine)
    img = read_volume(tmp_path / "img.nii.gz")
    seg = np.zeros((1, 5, 6, 7), np.uint8)
    seg[0, 1:3, 2:4, 3:5] = 2
    write_volume(img.with_array(seg), tmp_path / "seg.nii.gz", dtype=np.uint8)
    back = nib.load(str(tmp_path / "seg.nii.gz"))
    assert back.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(back.affine, nib.load(str(tmp_path / "img.nii.gz")).affine)
    np.testing.assert_array_equal(read_label(tmp_path / "seg.nii.gz").array, seg)


def test_multichannel_4d_file_and_channel_files_agree(tmp_path):
    rng = np.random.default_rng(1)
    chans = rng.normal(size=(2, 6, 5, 4)).astype(np.float32)
    save(np.moveaxis(chans, 0, -1), tmp_path / "msd.nii.gz")
    save(chans[0], tmp_path / "case_0000.nii.gz")
    save(chans[1], tmp_path / "case_0001.nii.gz")
    a = read_volume(tmp_path / "msd.nii.gz")
    b = read_volume([tmp_path / "case_0000.nii.gz", tmp_path / "case_0001.nii.gz"])
    assert a.array.shape == b.array.shape == (2, 6, 5, 4)
    np.testing.assert_array_equal(a.array, b.array)
    write_volume(a, tmp_path / "back.nii.gz")
    assert nib.load(str(tmp_path / "back.nii.gz")).shape == (6, 5, 4, 2)


def test_header_is_read_without_voxels_and_2d_files_work(tmp_path):
    save(np.zeros((8, 9), np.float32), tmp_path / "slice.nii.gz")
    h = read_header(tmp_path / "slice.nii.gz")
    assert h.shape == (8, 9) and h.spatial_ndim == 2
    vol = read_volume(tmp_path / "slice.nii.gz")
    assert vol.array.shape == (1, 8, 9) and vol.ndim == 2 and len(vol.spacing) == 2


def test_truncated_gzip_and_non_nifti_give_input_error(tmp_path):
    good = save(np.ones((30, 30, 30), np.float32), tmp_path / "good.nii.gz")
    raw = good.read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError, match="truncated or corrupt|not a readable"):
        read_volume(tmp_path / "cut.nii.gz")
    (tmp_path / "text.nii.gz").write_text("not an image")
    with pytest.raises(InputError):
        read_volume(tmp_path / "text.nii.gz")


def test_float_label_with_fractions_is_rejected(tmp_path):
    save(np.full((3, 3, 3), 0.5, np.float32), tmp_path / "lab.nii.gz")
    with pytest.raises(InputError, match="non-integer"):
        read_label(tmp_path / "lab.nii.gz")


def test_write_refuses_to_overwrite_and_leaves_no_temp(tmp_path):
    vol = Volume(np.zeros((1, 3, 3, 3), np.float32), np.eye(4))
    write_volume(vol, tmp_path / "x.nii.gz")
    with pytest.raises(OutputExistsError):
        write_volume(vol, tmp_path / "x.nii.gz")
    write_volume(vol, tmp_path / "x.nii.gz", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.nii.gz"]


def test_atomic_writes_get_the_umask_mode_not_mkstemps_0600(tmp_path):
    import importlib
    import os
    import stat

    import medseg3d.io.atomic as atomic

    old = os.umask(0o022)
    try:
        importlib.reload(atomic)  # the module reads the umask once, at import
        atomic.write_json_atomic(tmp_path / "a.json", {"x": 1})
        assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    finally:
        os.umask(old)
        importlib.reload(atomic)
