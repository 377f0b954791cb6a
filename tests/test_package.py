"""Model packages (`medseg3d export`, `predict -m FILE.zip`) and the Python API (`medseg3d.Segmenter`).

A tiny two-fold U-Net trained for one iteration on the shipped hippocampus_mini: the plumbing
(bit-for-bit equal predictions, no pickle, refused damaged/foreign/altered packages), not accuracy.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from safetensors.torch import load as load_safetensors

from medseg3d.cli import main
from medseg3d.package import MANIFEST, PACKAGE_VERSION, open_package
from tests._synth import SHIPPED, run_cli, tiny_train_args, train_shipped

torch.set_num_threads(1)
TRAIN = tiny_train_args(1)
CASES = ["hippocampus_314", "hippocampus_341"]
DECISION = {"largest_component_foreground": False, "largest_component_classes": [1], "dice_before": 0.5,
            "dice_after": 0.6}


cli = run_cli


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """WORK_DIR with folds 0 and 1 trained (one iteration each) and a postprocessing decision."""
    wd = train_shipped(tmp_path_factory, folds=("0", "1"))
    (wd / "results" / "3d_fullres" / "unet" / "postprocessing.json").write_text(json.dumps(DECISION))
    return wd


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("in")
    for case in CASES:
        shutil.copy(SHIPPED / "imagesTs" / f"{case}.nii.gz", folder)
    return folder


@pytest.fixture(scope="module")
def package(trained, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pkg") / "model.zip"
    with pytest.raises(SystemExit) as ex:
        main(["export", str(trained), "-o", str(out), "--folds", "0,1"])
    assert ex.value.code in (0, None)
    return out


@pytest.fixture(scope="module")
def from_work_dir(trained, inputs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pred_wd")
    with pytest.raises(SystemExit) as ex:
        main(["predict", "-m", str(trained), "-i", str(inputs), "-o", str(out), "--folds", "0,1", "--device", "cpu"])
    assert ex.value.code in (0, None)
    return out


def test_predict_from_the_package_equals_the_work_dir_bit_for_bit(package, inputs, from_work_dir, tmp_path, capsys):
    code, out = cli(["predict", "-m", str(package), "-i", str(inputs), "-o", str(tmp_path), "--device", "cpu"], capsys)
    assert code == 0, out
    for case in CASES:  # same files, byte for byte (TTA on, two folds averaged, postprocessing applied)
        assert (tmp_path / f"{case}.nii.gz").read_bytes() == (from_work_dir / f"{case}.nii.gz").read_bytes()
    code, out = cli(["predict", "-m", str(package), "-i", str(inputs), "-o", str(tmp_path / "b"), "--config", "2d"],
                    capsys)
    assert code == 2 and "holds configuration '3d_fullres' only" in out and "Traceback" not in out
    code, out = cli(["predict", "-m", str(package), "-i", str(inputs), "-o", str(tmp_path / "b"), "--folds", "3"],
                    capsys)
    assert code == 2 and "has no fold 3; it holds folds 0, 1" in out


def test_the_package_holds_no_pickle_and_every_member_is_hashed(package, trained):
    with zipfile.ZipFile(package) as zf:
        names = zf.namelist()
        manifest = json.loads(zf.read(MANIFEST))
        members = {n: zf.read(n) for n in names}
    assert not [n for n in names if n.endswith((".pt", ".pth", ".pkl", ".pickle", ".npy"))]
    assert sorted(names) == sorted([MANIFEST, "plans.json", "labels.json", "postprocessing.json",
                                    "fold_0/weights.safetensors", "fold_0/checkpoint.json",
                                    "fold_1/weights.safetensors", "fold_1/checkpoint.json"])
    assert manifest["format_version"] == PACKAGE_VERSION and manifest["folds"] == [0, 1]
    assert manifest["configuration"] == "3d_fullres" and manifest["architecture"] == "unet"
    assert manifest["medseg3d_version"] and manifest["created"] and manifest["postprocessing"] is True
    import hashlib

    for name, entry in manifest["members"].items():
        assert hashlib.sha256(members[name]).hexdigest() == entry["sha256"]
    assert members["plans.json"] == (trained / "plans.json").read_bytes()
    assert json.loads(members["labels.json"])["labels"] == {"0": "background", "1": "Anterior", "2": "Posterior"}
    ckpt = torch.load(trained / "results/3d_fullres/unet/fold_1/checkpoint_final.pt", weights_only=True)
    weights = load_safetensors(members["fold_1/weights.safetensors"])
    assert weights.keys() == ckpt["model"].keys()
    assert all(torch.equal(weights[k], v) and weights[k].dtype == v.dtype for k, v in ckpt["model"].items())
    meta = json.loads(members["fold_1/checkpoint.json"])
    for key in ("network_kwargs", "plan_hash", "plan_identity", "architecture", "in_channels", "num_classes",
                "configuration"):
        assert meta[key] == ckpt[key]
    assert meta["fold"] == 1 and "optimizer" not in meta and "rng" not in meta


def _rewrite(src: Path, dst: Path, *, change: dict[str, bytes] | None = None, add: dict[str, bytes] | None = None) -> Path:
    """A copy of the zip `src` with members replaced/added (valid CRCs: only the manifest can tell)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            zout.writestr(name, (change or {}).get(name, zin.read(name)))
        for name, data in (add or {}).items():
            zout.writestr(name, data)
    return dst


def _flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 1])


def _bad_packages(package: Path, tmp: Path) -> dict[str, tuple[Path, str]]:
    """name -> (a bad package, what the message must say)."""
    with zipfile.ZipFile(package) as zf:
        weights = zf.read("fold_0/weights.safetensors")
        manifest = json.loads(zf.read(MANIFEST))
    truncated = tmp / "truncated.zip"
    truncated.write_bytes(package.read_bytes()[: package.stat().st_size // 2])
    crc = tmp / "crc.zip"  # one byte flipped inside a stored member of the file itself: the zip's CRC-32 fails
    raw = bytearray(package.read_bytes())
    raw[raw.find(weights) + len(weights) // 2] ^= 0xFF
    crc.write_bytes(bytes(raw))
    foreign = tmp / "foreign.zip"
    with zipfile.ZipFile(foreign, "w") as zf:
        zf.writestr("model.pt", b"not ours")
    newer = dict(manifest, format_version=PACKAGE_VERSION + 1)
    return {
        "tampered": (_rewrite(package, tmp / "tampered.zip", change={"fold_0/weights.safetensors":
                                                                     _flip_last_byte(weights)}),
                     "member fold_0/weights.safetensors has sha256"),
        "unlisted": (_rewrite(package, tmp / "unlisted.zip", add={"extra.pkl": b"\x80\x04."}), "unlisted extra.pkl"),
        "truncated": (truncated, "is not a readable zip file"),
        "crc": (crc, "member fold_0/weights.safetensors cannot be read"),
        "foreign": (foreign, f"holds no {MANIFEST}: it is not a medseg3d model package"),
        "newer": (_rewrite(package, tmp / "newer.zip", change={MANIFEST: json.dumps(newer).encode()}),
                  f"has format version {PACKAGE_VERSION + 1}; this medseg3d"),
    }


def test_damaged_foreign_altered_and_newer_packages_are_refused_with_one_message(package, inputs, tmp_path, capsys):
    from medseg3d import Segmenter
    from medseg3d.errors import PackageError

    for kind, (bad, says) in _bad_packages(package, tmp_path).items():
        code, out = cli(["predict", "-m", str(bad), "-i", str(inputs), "-o", str(tmp_path / kind)], capsys)
        assert code == 2 and says in out and "Traceback" not in out, (kind, out)
        assert str(bad) in out and not (tmp_path / kind).exists()
        with pytest.raises(PackageError, match="re-export|export one"):
            Segmenter(bad, device="cpu")


def test_export_refuses_an_existing_file_without_overwrite(package, trained, capsys):
    before = package.read_bytes()
    code, out = cli(["export", str(trained), "-o", str(package)], capsys)
    assert code == 2 and "already exists; pass --overwrite" in out and package.read_bytes() == before
    code, out = cli(["export", str(trained), "-o", str(package.with_suffix(".tar"))], capsys)
    assert code == 2 and "a model package is a .zip file" in out


def test_segmenter_gives_the_same_labels_for_every_kind_of_input(package, trained, from_work_dir):
    from medseg3d import Segmenter

    path = SHIPPED / "imagesTs" / f"{CASES[0]}.nii.gz"
    expected = np.asarray(nib.load(from_work_dir / path.name).dataobj)
    seg = Segmenter(package, device="cpu")
    assert seg.labels == {0: "background", 1: "Anterior", 2: "Posterior"} and seg.tta
    image = nib.load(path)
    by_path, by_nib = seg(path), seg(image)
    itk = sitk.ReadImage(str(path))
    by_sitk = seg(itk)
    by_array = seg(np.asarray(image.dataobj, dtype=np.float32), spacing=image.header.get_zooms())
    assert isinstance(by_path, nib.Nifti1Image) and isinstance(by_nib, nib.Nifti1Image)
    assert isinstance(by_sitk, sitk.Image) and isinstance(by_array, np.ndarray)
    for labels in (np.asarray(by_path.dataobj), np.asarray(by_nib.dataobj), sitk.GetArrayFromImage(by_sitk).T,
                   by_array):
        assert labels.dtype == np.uint8 and np.array_equal(labels, expected)  # what `predict` writes
    for out in (by_path, by_nib):
        assert np.array_equal(out.affine, image.affine) and out.shape == image.shape
        assert out.header.get_sform(coded=True)[1] == image.header.get_sform(coded=True)[1]
    assert by_sitk.GetSize() == itk.GetSize() and by_sitk.GetOrigin() == itk.GetOrigin()
    assert by_sitk.GetSpacing() == itk.GetSpacing() and by_sitk.GetDirection() == itk.GetDirection()
    from_dir = Segmenter(trained, device="cpu", folds=[0, 1], tta=False)  # a WORK_DIR works the same way
    assert np.array_equal(from_dir(image.get_fdata(dtype=np.float32), spacing=(1, 1, 1)),
                          Segmenter(package, device="cpu", tta=False)(path).get_fdata().astype(np.uint8))


def test_importing_medseg3d_does_not_import_torch():
    code = "import sys, medseg3d; assert 'torch' not in sys.modules; assert callable(medseg3d.Segmenter)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_a_package_opens_with_its_folds_and_plan(package):
    pkg = open_package(package)
    assert pkg.folds == [0, 1] and pkg.postprocessing == DECISION
    assert pkg.plans.network_hash("3d_fullres", "unet") == pkg.manifest["plan_hash"]
