"""The 3d_lowres -> 3d_cascade_fullres cascade: plumbing, not accuracy.

A synthetic dataset large enough for `plan --gpu-memory 0.05` to plan 3d_lowres and the cascade;
tiny networks and one iteration. Checked: the missing-stage message, the previous stage's cache,
the extra input channels (in the batches and the checkpoint), one-command predict and
`--previous-stage DIR` giving the same labels, and the cascade augmentation.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medseg3d.cascade import MAX_COMPONENT_FRACTION, cascade_augment, one_hot_foreground, previous_cache_dir
from medseg3d.cli import main
from medseg3d.plans.schema import Plans
from tests._synth import make_msd

torch.set_num_threads(1)
TINY = ["--features", "4,8,8", "--iterations-per-epoch", "1", "--val-iterations", "1", "--epochs", "1",
        "--batch-size", "2", "--device", "cpu", "--num-workers", "0", "--no-val-tta"]


def cli(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    return (0 if exc.value.code is None else int(exc.value.code)), "".join(capsys.readouterr())


@pytest.fixture(scope="module")
def planned(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("casc")
    data = make_msd(root / "data", n_cases=5, shape=(64, 64, 48))
    wd = root / "wd"
    with pytest.raises(SystemExit) as exc:
        main(["plan", str(data), "-o", str(wd), "-j", "1", "--gpu-memory", "0.05",
              "--configs", "3d_fullres,3d_lowres,3d_cascade_fullres"])
    assert exc.value.code in (0, None)
    plans = Plans.load(wd)
    assert plans.configuration("3d_cascade_fullres").previous_stage == "3d_lowres"
    return data, wd


def test_cascade_names_the_lowres_fold_it_needs(planned, capsys):
    _, wd = planned
    code, out = cli(["train", str(wd), "--config", "3d_cascade_fullres", "--fold", "1", *TINY], capsys)
    assert code == 2 and "Traceback" not in out
    assert "3d_lowres fold 1" in out and "--config 3d_lowres" in out and "--fold 1" in out
    assert not (wd / "results" / "3d_cascade_fullres").exists()  # nothing written before the check


@pytest.fixture(scope="module")
def cascaded(planned) -> tuple[Path, Path]:
    """`planned` with 3d_lowres fold 0 and then 3d_cascade_fullres fold 0 trained (one iteration each)."""
    data, wd = planned
    for config in ("3d_lowres", "3d_cascade_fullres"):
        with pytest.raises(SystemExit) as exc:
            main(["train", str(wd), "--config", config, "--fold", "0", *TINY])
        assert exc.value.code in (0, None), config
    return data, wd


def test_cascade_trains_on_the_lowres_predictions_and_predicts_in_one_command(cascaded, tmp_path, capsys):
    data, wd = cascaded
    plans = Plans.load(wd)
    fold = wd / "results" / "3d_cascade_fullres" / "unet" / "fold_0"
    ckpt = torch.load(fold / "checkpoint_final.pt", weights_only=True)
    assert ckpt["in_channels"] == 1 + 2  # the image + one channel per foreground class of the lowres stage
    prev = previous_cache_dir(wd, plans, "3d_cascade_fullres", "unet", 0)
    cached = sorted(p.stem for p in prev.glob("*.npy"))
    assert cached == [f"case_{i:03d}" for i in range(5)]  # training and validation cases of the fold
    stamp = json.loads((prev / "stage.json").read_text())
    assert stamp["previous_stage"] == "3d_lowres" and len(stamp["sha256"]) == 64
    full = np.load(wd / "preprocessed" / "3d_fullres" / "case_000_seg.npy", mmap_mode="r") \
        if (wd / "preprocessed" / "3d_fullres" / "case_000_seg.npy").exists() else None
    seg = np.load(prev / "case_000.npy")
    assert seg.dtype == np.uint8 and set(np.unique(seg)) <= {0, 1, 2}
    if full is not None:
        assert seg.shape == full.shape  # on the fullres grid
    assert (fold / "validation" / "summary.json").is_file()  # the final validation ran the lowres stage first

    images = tmp_path / "images"
    images.mkdir()
    for case in ("case_000", "case_003"):
        (images / f"{case}_0000.nii.gz").symlink_to(data / "imagesTr" / f"{case}.nii.gz")
    one = tmp_path / "one_command"
    code, out = cli(["predict", "-m", str(wd), "-i", str(images), "-o", str(one), "--config", "3d_cascade_fullres",
                     "--folds", "0", "--no-tta", "--device", "cpu"], capsys)
    assert code == 0, out
    low = tmp_path / "lowres"
    assert cli(["predict", "-m", str(wd), "-i", str(images), "-o", str(low), "--config", "3d_lowres", "--folds", "0",
                "--no-tta", "--device", "cpu"], capsys)[0] == 0
    given = tmp_path / "given"
    code, out = cli(["predict", "-m", str(wd), "-i", str(images), "-o", str(given), "--config", "3d_cascade_fullres",
                     "--folds", "0", "--no-tta", "--device", "cpu", "--previous-stage", str(low)], capsys)
    assert code == 0, out
    for case in ("case_000", "case_003"):
        a = nib.load(one / f"{case}.nii.gz")
        b = nib.load(given / f"{case}.nii.gz")
        assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
        assert np.allclose(a.affine, nib.load(data / "imagesTr" / f"{case}.nii.gz").affine)
    # the exported networks: the fullres stage takes the image + K - 1 channels, and both stages run on it
    pytest.importorskip("onnxruntime")
    outs = {}
    for backend in ("onnxruntime", "torch"):
        outs[backend] = tmp_path / backend
        code, out = cli(["predict", "-m", str(wd), "-i", str(images), "-o", str(outs[backend]), "--config",
                         "3d_cascade_fullres", "--folds", "0", "--no-tta", "--device", "cpu", "--precision", "fp32",
                         "--backend", backend], capsys)
        assert code == 0, out
    for case in ("case_000", "case_003"):
        a = np.asarray(nib.load(outs["torch"] / f"{case}.nii.gz").dataobj)
        b = np.asarray(nib.load(outs["onnxruntime"] / f"{case}.nii.gz").dataobj)
        assert (a != b).mean() < 1e-3  # float32 both; a barely trained network's ties may go either way
    (low / "case_003.nii.gz").unlink()
    code, out = cli(["predict", "-m", str(wd), "-i", str(images), "-o", str(tmp_path / "partial"), "--config",
                     "3d_cascade_fullres", "--folds", "0", "--no-tta", "--device", "cpu", "--previous-stage", str(low)],
                    capsys)
    assert code != 0 and "case_003" in out and "Traceback" not in out
    assert (tmp_path / "partial" / "case_000.nii.gz").is_file()  # the other case was still written


def test_cascade_batches_carry_the_previous_stage_as_one_hot_channels(planned):
    from medseg3d.data.loader import BatchStream, StreamSpec

    _, wd = planned
    plans = Plans.load(wd)
    prev = previous_cache_dir(wd, plans, "3d_cascade_fullres", "unet", 0)
    if not prev.is_dir():
        pytest.skip("needs the cascade test above (module order)")
    cfg = plans.configuration("3d_cascade_fullres")
    spec = StreamSpec(wd, cfg.data_identifier, ["case_000"], tuple(cfg.patch_size), 2, previous_dir=prev,
                      num_classes=3)
    image, label = BatchStream(spec).batch(np.random.default_rng(0), torch.Generator().manual_seed(0))
    assert tuple(image.shape) == (2, 3, *cfg.patch_size) and tuple(label.shape) == (2, 1, *cfg.patch_size)
    onehot = image[:, 1:]
    assert set(torch.unique(onehot).tolist()) <= {0.0, 1.0} and float(onehot.sum(1).max()) <= 1.0


def test_cascade_augmentation_keeps_shapes_and_removes_only_small_components():
    seg = torch.zeros(1, 24, 24, 24, dtype=torch.long)
    seg[0, 2:5, 2:5, 2:5] = 1  # a small component
    seg[0, 10:20, 10:20, 10:20] = 2
    onehot = one_hot_foreground(seg, 3)
    assert tuple(onehot.shape) == (1, 2, 24, 24, 24) and onehot[0, 0].sum() == 27 and onehot[0, 1].sum() == 1000
    changed = 0
    for seed in range(20):
        out = cascade_augment(onehot.clone(), np.random.default_rng(seed))
        assert out.shape == onehot.shape and set(torch.unique(out).tolist()) <= {0.0, 1.0}
        changed += int(not torch.equal(out, onehot))
    assert 0 < changed < 20  # applied to some samples (p 0.4 and 0.2), not all
    big = torch.ones(1, 1, 10, 10, 10)  # one component covering the whole patch: never removed
    assert MAX_COMPONENT_FRACTION < 1
    for seed in range(10):
        assert cascade_augment(big.clone(), np.random.default_rng(seed)).sum() > 0


def test_find_best_needs_the_lowres_folds_and_predict_best_reproduces_the_cascade(cascaded, tmp_path, capsys):
    """A cascade winner predicts with its lowres stage in one command, bit for bit its validation."""
    data, wd = cascaded
    lowres = wd / "results" / "3d_lowres" / "unet" / "fold_0"
    hidden = tmp_path / "hidden_lowres"
    (lowres / "checkpoint_final.pt").rename(hidden)
    try:
        code, out = cli(["find-best", str(wd), "--folds", "0", "--configs", "3d_cascade_fullres"], capsys)
    finally:
        hidden.rename(lowres / "checkpoint_final.pt")
    assert code != 0 and "Traceback" not in out
    assert "3d_lowres fold 0 is not trained" in " ".join(out.split()), out

    code, out = cli(["find-best", str(wd), "--folds", "0", "--configs", "3d_cascade_fullres"], capsys)
    assert code == 0, out
    selection = json.loads((wd / "selection.json").read_text())
    assert selection["winner"]["name"] == "3d_cascade_fullres/unet"
    validation = wd / "results" / "3d_cascade_fullres" / "unet" / "fold_0" / "validation"
    cases = sorted(p.name[:-len(".nii.gz")] for p in validation.glob("*.nii.gz"))
    assert cases
    images = tmp_path / "images"
    images.mkdir()
    for case in cases:
        (images / f"{case}_0000.nii.gz").symlink_to(data / "imagesTr" / f"{case}.nii.gz")
    code, out = cli(["predict", "-m", str(wd), "--best", "-i", str(images), "-o", str(tmp_path / "best"),
                     "--device", "cpu"], capsys)
    assert code == 0, out
    from medseg3d.postprocess import apply_postprocessing

    decision = selection["winner"]["postprocessing"]
    for case in cases:
        expected = apply_postprocessing(np.asarray(nib.load(validation / f"{case}.nii.gz").dataobj), decision)
        got = np.asarray(nib.load(tmp_path / "best" / f"{case}.nii.gz").dataobj)
        np.testing.assert_array_equal(got, expected)
