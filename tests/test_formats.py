"""Formats in and out (issue 18, item 3): NIfTI, NRRD, MHA/MHD and DICOM series read with exact geometry;
`predict` writes the input's format (a DICOM series gives a DICOM SEG); bad DICOM folders are refused.

Geometry is given here in ITK's terms (LPS origin, spacing, row-major direction) and the expected
nibabel affine is written out by hand (`diag(-1, -1, 1) @ [direction @ diag(spacing) | origin]`), so
the tests do not lean on `medseg3d.io.convert`, the code under test.
"""

from __future__ import annotations

import json
import locale
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from medseg3d.cli import main
from medseg3d.errors import InputError
from medseg3d.inference.writer import output_endings, write_segmentation
from medseg3d.io import read_header, read_label, read_volume
from medseg3d.io.dataset import Case, input_cases_and_problems
from medseg3d.io.dicom import check_series
from tests._synth import SHIPPED, run_cli, train_shipped

torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="module")
def _keep_locale():
    """SimpleITK's DICOM writer (GDCM) switches the whole process to the C locale; Python then opens text
    files as ASCII, and later tests fail far from here (torch.compile's inductor templates hold UTF-8).
    Only these tests write DICOM with SimpleITK (medseg3d reads it, which leaves the locale alone)."""
    saved = locale.setlocale(locale.LC_ALL)
    yield
    locale.setlocale(locale.LC_ALL, saved)


cli = run_cli

_C, _S = np.cos(0.3), np.sin(0.3)
_ROT = np.array([[_C, -_S, 0], [_S, _C, 0], [0, 0, 1]]) @ np.array(
    [[1, 0, 0], [0, np.cos(0.2), -np.sin(0.2)], [0, np.sin(0.2), np.cos(0.2)]])
#: Oblique, non-RAS and right-handed (a DICOM stack along its normal can only be that).
DIRECTION = _ROT @ np.diag([1.0, -1.0, -1.0])
#: The same, left-handed (NIfTI sform, NRRD and MHA hold it; DICOM cannot).
LEFT_HANDED = _ROT @ np.diag([-1.0, 1.0, 1.0])
ORIGIN = (12.5, -30.25, 7.125)  # LPS mm
SPACING = (0.7, 1.3, 2.5)  # mm, anisotropic


def ras_affine(origin, spacing, direction) -> np.ndarray:
    """nibabel's affine of ITK geometry, written out independently of medseg3d.io.convert."""
    aff = np.eye(4)
    aff[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ np.asarray(direction).reshape(3, 3) @ np.diag(spacing)
    aff[:3, 3] = np.diag([-1.0, -1.0, 1.0]) @ np.asarray(origin)
    return aff


def itk_image(xyz: np.ndarray, origin=ORIGIN, spacing=SPACING, direction=DIRECTION) -> sitk.Image:
    """Voxels `(X, Y, Z)` as a SimpleITK image with the given LPS geometry."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(xyz.transpose(2, 1, 0)))
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(np.asarray(direction).ravel().tolist())
    return image


def write_dicom_series(image: sitk.Image, folder: Path, series_uid: str, skip: tuple[int, ...] = (),
                       prefix: str = "IM") -> list[Path]:
    """One MR slice file `PREFIXkkkk` per z index k (SimpleITK's DicomSeriesFromArray recipe), `skip` left out."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetImageIO("GDCMImageIO")
    d = image.GetDirection()
    tags = {"0008|0060": "MR", "0008|0008": "DERIVED\\SECONDARY", "0010|0010": "Test^Formats", "0010|0020": "F001",
            "0020|000d": "1.2.826.0.1.3680043.8.498.1", "0020|0052": "1.2.826.0.1.3680043.8.498.2",
            "0020|000e": series_uid, "0020|0011": "7", "0008|103e": "synthetic oblique",
            "0020|0037": "\\".join(repr(float(v)) for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
            "0018|0050": str(image.GetSpacing()[2])}
    files = []
    for k in range(image.GetDepth()):
        if k in skip:
            continue
        sl = image[:, :, k]
        for key, value in tags.items():
            sl.SetMetaData(key, value)
        sl.SetMetaData("0020|0032", "\\".join(repr(float(v)) for v in image.TransformIndexToPhysicalPoint((0, 0, k))))
        sl.SetMetaData("0020|0013", str(k + 1))
        sl.SetMetaData("0008|0018", f"{series_uid}.{k + 1}")
        files.append(folder / f"{prefix}{k:04d}")  # no extension, as PACS exports often are
        writer.SetFileName(str(files[-1]))
        writer.Execute(sl)
    return files


def write_source(fmt: str, xyz: np.ndarray, path_stem: Path, direction=DIRECTION) -> Path:
    """`xyz` (int16) written in `fmt` by nibabel / SimpleITK with the module's geometry; the path to read."""
    image = itk_image(xyz, direction=direction)
    if fmt == "nifti":
        path = path_stem.with_name(path_stem.name + ".nii.gz")
        img = nib.Nifti1Image(xyz, ras_affine(ORIGIN, SPACING, direction))
        img.set_sform(img.affine, code=2)
        nib.save(img, str(path))
    elif fmt == "dicom":
        path = path_stem
        write_dicom_series(image, path, "1.2.826.0.1.3680043.8.498.10")
    else:
        path = path_stem.with_name(f"{path_stem.name}.{fmt}")
        sitk.WriteImage(image, str(path), useCompression=fmt != "mhd")
    return path


def ramp(shape=(11, 9, 6)) -> np.ndarray:
    """Distinct int16 values that would show any axis swap or flip."""
    return (np.arange(np.prod(shape)).reshape(shape) * 7 % 1000 - 300).astype(np.int16)


@pytest.mark.parametrize("fmt", ["nifti", "nrrd", "mha", "mhd", "dicom"])
def test_an_oblique_volume_round_trips_with_identical_voxels_and_geometry(fmt, tmp_path):
    xyz = ramp()
    src = write_source(fmt, xyz, tmp_path / "case")
    expected = ras_affine(ORIGIN, SPACING, DIRECTION)
    tol = 1e-5 if fmt == "nifti" else 1e-9  # NIfTI holds the affine in float32; the others in decimal text
    vol = read_volume(src)
    assert vol.array.shape == (1, *xyz.shape)
    assert np.array_equal(vol.array[0], xyz)
    np.testing.assert_allclose(vol.affine, expected, atol=tol, rtol=0)
    header = read_header(src)
    assert header.shape == xyz.shape
    np.testing.assert_allclose(header.affine, expected, atol=tol, rtol=0)
    np.testing.assert_allclose(header.spacing, SPACING, rtol=1e-6)
    assert np.array_equal(read_label(src).array[0], xyz)

    if fmt == "dicom":
        return  # labels of a DICOM series go out as DICOM SEG (test_predict_from_each_format_...)
    out = tmp_path / f"labels{output_endings([Case('c', (src,))])['c']}"
    labels = (xyz % 3).astype(np.uint8)
    write_segmentation(labels, vol, out, overwrite=False)
    back = sitk.ReadImage(str(out))
    assert np.array_equal(sitk.GetArrayFromImage(back).transpose(2, 1, 0), labels)
    np.testing.assert_allclose(back.GetOrigin(), ORIGIN, atol=tol * 10)
    np.testing.assert_allclose(back.GetSpacing(), SPACING, atol=tol * 10)
    np.testing.assert_allclose(back.GetDirection(), DIRECTION.ravel(), atol=tol * 10)


@pytest.mark.parametrize("fmt", ["nifti", "nrrd", "mha"])
def test_a_left_handed_grid_round_trips_through_the_file_formats(fmt, tmp_path):
    xyz = ramp((5, 7, 4))
    src = write_source(fmt, xyz, tmp_path / "case", direction=LEFT_HANDED)
    vol = read_volume(src)
    assert np.array_equal(vol.array[0], xyz)
    np.testing.assert_allclose(vol.affine, ras_affine(ORIGIN, SPACING, LEFT_HANDED), atol=1e-5, rtol=0)
    out = tmp_path / ("labels.nii.gz" if fmt == "nifti" else f"labels.{fmt}")
    write_segmentation(xyz.astype(np.uint8), vol, out, overwrite=False)
    np.testing.assert_allclose(sitk.ReadImage(str(out)).GetDirection(), LEFT_HANDED.ravel(), atol=1e-5)


def test_output_format_choices_are_checked_before_any_work(tmp_path):
    nii, dcm = Case("a", (tmp_path / "a.nii",)), Case("b", (tmp_path,), series_uid="1.2")
    assert output_endings([nii, Case("m", (tmp_path / "m.mhd",))]) == {"a": ".nii", "m": ".mha"}
    assert output_endings([nii], "nrrd") == {"a": ".nrrd"}
    with pytest.raises(InputError, match="did you mean nifti"):
        output_endings([nii], "nift")
    with pytest.raises(InputError, match="dicom-seg needs DICOM series inputs.*case\\(s\\) a"):
        output_endings([nii, dcm], "dicom-seg")


def test_without_highdicom_a_dicom_series_gets_nifti_with_a_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr("medseg3d.io.dicom_seg.highdicom_available", lambda: False)
    dcm = Case("b", (tmp_path,), series_uid="1.2")
    with caplog.at_level("WARNING", logger="medseg3d.inference.writer"):
        assert output_endings([dcm]) == {"b": ".nii.gz"}
    assert "highdicom is not installed" in caplog.text
    with pytest.raises(InputError, match="dicom-seg needs highdicom"):
        output_endings([dcm], "dicom-seg")


# -- bad DICOM folders ---------------------------------------------------------------------------------

def test_a_folder_with_several_series_is_refused_naming_them_and_series_uid_chooses(tmp_path):
    xyz = ramp((6, 5, 4))
    write_dicom_series(itk_image(xyz), tmp_path / "in" / "two", "1.2.826.0.1.3680043.8.498.21")
    write_dicom_series(itk_image(xyz[::-1].copy()), tmp_path / "in" / "two", "1.2.826.0.1.3680043.8.498.22",
                       prefix="B")
    cases, problems = input_cases_and_problems(tmp_path / "in", 1)
    assert cases == [] and len(problems) == 1
    name, why = problems[0]
    assert name == "two" and str(tmp_path / "in" / "two") in why
    assert "1.2.826.0.1.3680043.8.498.21" in why and "1.2.826.0.1.3680043.8.498.22" in why and "--series-uid" in why
    cases, problems = input_cases_and_problems(tmp_path / "in", 1, series_uid="1.2.826.0.1.3680043.8.498.22")
    assert problems == [] and cases[0].series_uid == "1.2.826.0.1.3680043.8.498.22"
    assert np.array_equal(read_volume(cases[0].images, series_uid=cases[0].series_uid).array[0], xyz[::-1])
    with pytest.raises(InputError, match="no series with SeriesInstanceUID 9.9"):
        check_series(tmp_path / "in" / "two", "9.9")


def test_missing_slices_and_uneven_spacing_are_refused_naming_the_folder(tmp_path):
    image = itk_image(ramp((6, 5, 8)))
    write_dicom_series(image, tmp_path / "in" / "gap", "1.2.826.0.1.3680043.8.498.31", skip=(3,))
    uneven = write_dicom_series(image, tmp_path / "in" / "uneven", "1.2.826.0.1.3680043.8.498.32")
    moved = sitk.ReadImage(str(uneven[5]))  # slice 5 nudged 0.6 mm along the normal
    nudged = np.array(image.TransformIndexToPhysicalPoint((0, 0, 5))) + 0.6 * np.cross(DIRECTION[:, 0], DIRECTION[:, 1])
    moved.SetOrigin(nudged.tolist())
    moved.SetMetaData("0020|0032", "\\".join(repr(float(v)) for v in nudged))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetImageIO("GDCMImageIO")
    writer.SetFileName(str(uneven[5]))
    writer.Execute(moved)
    write_dicom_series(image, tmp_path / "in" / "good", "1.2.826.0.1.3680043.8.498.33")
    cases, problems = input_cases_and_problems(tmp_path / "in", 1)
    assert [c.name for c in cases] == ["good"]
    why = dict(problems)
    assert str(tmp_path / "in" / "gap") in why["gap"] and "about 1 slice(s) missing" in why["gap"]
    assert "IM0002 and IM0004" in why["gap"]
    assert str(tmp_path / "in" / "uneven") in why["uneven"] and "inconsistent spacing" in why["uneven"]


# -- predict from each format ------------------------------------------------------------------------

CASE_DIRECTION = _ROT @ np.diag([1.0, -1.0, -1.0])


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """WORK_DIR of the shipped hippocampus_mini with fold 0 trained for one iteration."""
    return train_shipped(tmp_path_factory)


@pytest.fixture(scope="module")
def one_image_four_formats(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """hippocampus_314 (int16, 1 mm) on an oblique LPS grid as case_nii.nii.gz, case_nrrd.nrrd, case_mha.mha
    and the DICOM series folder case_dcm/."""
    folder = tmp_path_factory.mktemp("formats_in")
    xyz = np.round(np.asarray(nib.load(str(SHIPPED / "imagesTs" / "hippocampus_314.nii.gz")).dataobj)).astype(np.int16)
    geometry = {"origin": ORIGIN, "spacing": (1.0, 1.0, 1.0), "direction": CASE_DIRECTION}
    image = itk_image(xyz, **geometry)
    nib.save(nib.Nifti1Image(xyz, ras_affine(**geometry)), str(folder / "case_nii.nii.gz"))
    sitk.WriteImage(image, str(folder / "case_nrrd.nrrd"), useCompression=True)
    sitk.WriteImage(image, str(folder / "case_mha.mha"), useCompression=True)
    write_dicom_series(image, folder / "case_dcm", "1.2.826.0.1.3680043.8.498.40")
    return folder, xyz


@pytest.fixture(scope="module")
def predicted(trained, one_image_four_formats, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("formats_out")
    with pytest.raises(SystemExit) as ex:
        main(["predict", "-m", str(trained), "-i", str(one_image_four_formats[0]), "-o", str(out), "--folds", "0",
              "--no-tta", "--device", "cpu"])
    assert ex.value.code in (0, None)
    return out


def test_predict_from_each_format_writes_the_matching_format(predicted, one_image_four_formats):
    from medseg3d.io.dicom_seg import highdicom_available

    folder, xyz = one_image_four_formats
    seg_ending = ".dcm" if highdicom_available() else ".nii.gz"
    assert sorted(p.name for p in predicted.iterdir() if not p.name.startswith(".")) == sorted(
        ["case_nii.nii.gz", "case_nrrd.nrrd", "case_mha.mha", f"case_dcm{seg_ending}"])
    labels = {}
    for name, src in (("case_nii.nii.gz", "case_nii.nii.gz"), ("case_nrrd.nrrd", "case_nrrd.nrrd"),
                      ("case_mha.mha", "case_mha.mha")):
        out, ref = sitk.ReadImage(str(predicted / name)), sitk.ReadImage(str(folder / src))
        assert out.GetPixelID() == sitk.sitkUInt8 and out.GetSize() == ref.GetSize()
        np.testing.assert_allclose(out.GetOrigin(), ref.GetOrigin(), atol=1e-5)
        np.testing.assert_allclose(out.GetSpacing(), ref.GetSpacing(), atol=1e-6)
        np.testing.assert_allclose(out.GetDirection(), ref.GetDirection(), atol=1e-6)
        labels[name] = sitk.GetArrayFromImage(out).transpose(2, 1, 0)
    first = labels["case_nii.nii.gz"]
    assert first.shape == xyz.shape and len(np.unique(first)) > 1
    assert all(np.array_equal(first, v) for v in labels.values())  # same voxels and spacing: same labels
    nii = nib.load(str(predicted / "case_nii.nii.gz"))
    np.testing.assert_allclose(nii.affine, nib.load(str(folder / "case_nii.nii.gz")).affine, atol=1e-6)


def test_the_dicom_seg_reads_back_as_the_same_mask_on_the_source_frames(predicted, one_image_four_formats):
    hd = pytest.importorskip("highdicom")
    import pydicom

    folder, _ = one_image_four_formats
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(predicted / "case_nii.nii.gz")))  # (Z, Y, X)
    sources = [pydicom.dcmread(str(f)) for f in check_series(folder / "case_dcm").files]
    seg = hd.seg.segread(str(predicted / "case_dcm.dcm"))
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Anterior", "Posterior"]
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    referenced = {r.SeriesInstanceUID for r in seg.ReferencedSeriesSequence}
    assert referenced == {sources[0].SeriesInstanceUID}
    mask = seg.get_pixels_by_source_instance(source_sop_instance_uids=[s.SOPInstanceUID for s in sources],
                                             combine_segments=True, relabel=False)
    assert mask.shape == expected.shape and np.array_equal(mask, expected)
    position = {s.SOPInstanceUID: np.array(s.ImagePositionPatient, float) for s in sources}
    for frame in seg.PerFrameFunctionalGroupsSequence:
        uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        np.testing.assert_allclose(np.array(frame.PlanePositionSequence[0].ImagePositionPatient, float),
                                   position[uid], atol=1e-4)


def test_output_format_overrides_and_bad_dicom_fails_alone(trained, one_image_four_formats, tmp_path, capsys):
    folder, _ = one_image_four_formats
    inp = tmp_path / "in"
    shutil.copytree(folder / "case_dcm", inp / "case_dcm")
    shutil.copy(folder / "case_mha.mha", inp)
    image = sitk.ReadImage(str(folder / "case_nrrd.nrrd"))
    write_dicom_series(image, inp / "broken", "1.2.826.0.1.3680043.8.498.50", skip=(10,))
    code, text = cli(["predict", "-m", str(trained), "-i", str(inp), "-o", str(tmp_path / "out"), "--folds", "0",
                      "--no-tta", "--device", "cpu", "--output-format", "nrrd"], capsys)
    assert code == 2
    assert "case broken" in text and "missing slices" in text
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["case_dcm.nrrd", "case_mha.nrrd"]
    a, b = (sitk.ReadImage(str(tmp_path / "out" / n)) for n in ("case_dcm.nrrd", "case_mha.nrrd"))
    assert np.array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
    np.testing.assert_allclose(a.GetDirection(), CASE_DIRECTION.ravel(), atol=1e-6)


# -- verify and plan on NRRD/MHA -----------------------------------------------------------------------

def test_verify_and_plan_read_an_msd_dataset_of_nrrd_images_and_mha_labels(tmp_path, capsys):
    meta = json.loads((SHIPPED / "dataset.json").read_text())
    keep = meta["training"][:4]
    roots = {"nifti": tmp_path / "nifti", "itk": tmp_path / "itk"}
    for root in roots.values():
        (root / "imagesTr").mkdir(parents=True)
        (root / "labelsTr").mkdir()
    training = []
    for entry in keep:
        name = Path(entry["image"]).name.removesuffix(".nii.gz")
        for sub in ("imagesTr", "labelsTr"):
            shutil.copy(SHIPPED / sub / f"{name}.nii.gz", roots["nifti"] / sub)
        img = sitk.ReadImage(str(SHIPPED / "imagesTr" / f"{name}.nii.gz"))
        lab = sitk.ReadImage(str(SHIPPED / "labelsTr" / f"{name}.nii.gz"))
        img.SetDirection(CASE_DIRECTION.ravel().tolist())  # orientation does not change a plan
        lab.SetDirection(CASE_DIRECTION.ravel().tolist())
        sitk.WriteImage(img, str(roots["itk"] / "imagesTr" / f"{name}.nrrd"), useCompression=True)
        sitk.WriteImage(lab, str(roots["itk"] / "labelsTr" / f"{name}.mha"), useCompression=True)
        training.append({"image": f"./imagesTr/{name}.nrrd", "label": f"./labelsTr/{name}.mha"})
    (roots["nifti"] / "dataset.json").write_text(json.dumps({**meta, "training": keep, "test": []}))
    (roots["itk"] / "dataset.json").write_text(json.dumps({**meta, "training": training, "test": []}))
    code, text = cli(["verify", str(roots["itk"])], capsys)
    assert code == 0 and "is valid" in text
    plans = {}
    for kind, root in roots.items():
        code, text = cli(["plan", str(root), "-o", str(tmp_path / f"wd_{kind}"), "-j", "1", "--configs", "3d_fullres"],
                         capsys)
        assert code == 0, text
        plans[kind] = json.loads((tmp_path / f"wd_{kind}" / "plans.json").read_text())["configurations"]
    assert plans["itk"] == plans["nifti"]


def test_evaluate_and_ensemble_read_the_nrrd_and_mha_predictions(trained, one_image_four_formats, tmp_path, capsys):
    """What predict writes in another format is scored by `evaluate` and averaged by `ensemble` in that format."""
    folder, _ = one_image_four_formats
    inp = tmp_path / "in"
    inp.mkdir()
    for name in ("case_nrrd.nrrd", "case_mha.mha"):
        shutil.copy(folder / name, inp)
    members = [tmp_path / "a", tmp_path / "b"]
    for out in members:
        code, text = cli(["predict", "-m", str(trained), "-i", str(inp), "-o", str(out), "--folds", "0", "--no-tta",
                          "--device", "cpu", "--save-probabilities"], capsys)
        assert code == 0, text
    refs = tmp_path / "refs"  # the same labels as NIfTI references on the same grid
    refs.mkdir()
    for name, case in (("case_nrrd.nrrd", "case_nrrd"), ("case_mha.mha", "case_mha")):
        sitk.WriteImage(sitk.ReadImage(str(members[0] / name)), str(refs / f"{case}.nii.gz"))
    report = tmp_path / "eval.json"
    code, text = cli(["evaluate", str(members[0]), str(refs), "--labels", "1,2", "--json", str(report), "-j", "1"],
                     capsys)
    assert code == 0, text
    summary = json.loads(report.read_text())
    assert summary["num_cases"] == 2
    assert all(summary["per_class_mean"][c]["dice"] == 1.0 for c in ("1", "2"))
    code, text = cli(["ensemble", *map(str, members), "-o", str(tmp_path / "ens")], capsys)
    assert code == 0, text
    assert sorted(p.name for p in (tmp_path / "ens").iterdir()) == ["case_mha.mha", "case_nrrd.nrrd"]
    for name in ("case_nrrd.nrrd", "case_mha.mha"):
        a, b = (sitk.ReadImage(str(d / name)) for d in (members[0], tmp_path / "ens"))
        assert np.array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
        np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)
        np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-5)
