"""Every seed architecture through the CLI on the shipped data: plan --arch, train, resume, predict, 2d and 3d_fullres.

Tiny networks and a few iterations: the plumbing (options in plan and checkpoint, declared loss
weights, the architecture's own patch in the sliding window), not accuracy.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from medseg3d.cli import main
from medseg3d.plans.planner import plan_from_fingerprint
from medseg3d.plans.schema import Plans
from tests._synth import SHIPPED
from tests.test_plans import CASES, synthetic_fingerprint

torch.set_num_threads(1)
SEEDS = ["fcn", "segnet", "deeplabv3", "deeplabv3plus", "pspnet", "fcdensenet", "dilated", "hdnet"]
EXTRA = {"fcdensenet": ["--arch-option", "preset=56"], "unet": ["--arch-option", "context=basic"],
         "fcn": ["--aux-loss", "hfd", "--aux-weight", "0.2"]}  # hdnet trains with HFD by default
AUX = {"hdnet": "hfd at weight 0.1", "fcn": "hfd at weight 0.2"}
#: a smaller 3D patch where the plan's costs minutes: FC-DenseNet's full-resolution dense blocks took 13 s per
#: step of 2 patches of 40x56x40 on the 2-core CPU (150 s for this test, a fifth of the suite)
PATCH = {("fcdensenet", "3d_fullres"): "16,24,16"}


def cli(argv: list[str], capsys=None) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out = "" if capsys is None else "".join(capsys.readouterr())
    return (0 if exc.value.code is None else int(exc.value.code)), out


@pytest.fixture(scope="module")
def planned(tmp_path_factory) -> Path:
    wd = tmp_path_factory.mktemp("arch") / "wd"
    code, _ = cli(["plan", str(SHIPPED), "-o", str(wd), "-j", "1", "--configs", "2d,3d_fullres", "--arch", "pspnet",
                   "--arch-option", "bins=1,2,3"])
    assert code == 0
    return wd


def test_plan_stores_the_architecture_and_its_options(planned):
    plans = Plans.load(planned)
    for name in ("2d", "3d_fullres"):
        cfg = plans.configuration(name)
        assert cfg.architecture == "pspnet" and cfg.planned_architectures == ["pspnet"]
        view = cfg.for_architecture("pspnet")
        assert view.architecture_options == {"output_stride": 8, "bins": [1, 2, 3], "aux": True, "aux_weight": 0.4,
                                             "norm": "instance"}
        assert view.network_kwargs()["options"]["bins"] == [1, 2, 3]
        assert cfg.for_architecture("unet").architecture_options == {}


def test_plan_sizes_patch_and_batch_for_the_architectures_own_memory():
    fp = synthetic_fingerprint(**CASES["isotropic"])  # 160^3 at 1 mm: the patch is memory-bound at 2 GB
    base = plan_from_fingerprint(fp, gpu_memory_gb=2.0, configs=["3d_fullres"])
    heavy = plan_from_fingerprint(fp, gpu_memory_gb=2.0, configs=["3d_fullres"], arch="vnet")
    light = plan_from_fingerprint(fp, gpu_memory_gb=2.0, configs=["3d_fullres"], arch="fcn")
    unet = base.configuration("3d_fullres")
    vnet = heavy.configuration("3d_fullres").for_architecture("vnet")
    fcn = light.configuration("3d_fullres").for_architecture("fcn")
    vox = lambda c: int(torch.tensor(c.patch_size).prod())  # noqa: E731
    assert vox(vnet) < vox(unet) <= vox(fcn)  # V-Net saves more per voxel, FCN less (measured on the meta device)
    for view in (unet, vnet, fcn):
        assert view.raw["estimated_memory_gb"] <= 2.0 * 1.05
    # the U-Net keys stay nnU-Net's plan whatever --arch says
    assert heavy.configuration("3d_fullres").patch_size == unet.patch_size


@pytest.mark.parametrize("arch", [*SEEDS, "unet"])  # unet: with the context plug-in at the bottleneck
def test_train_resume_predict_in_2d_and_3d(planned, tmp_path, arch, capsys):
    wd = shutil.copytree(planned, tmp_path / "wd", ignore=shutil.ignore_patterns("results"))
    for config, features in (("3d_fullres", "4,8,8,8"), ("2d", "4,8,8,8")):
        common = ["train", str(wd), "--config", config, "--arch", arch, "--features", features,
                  "--iterations-per-epoch", "2", "--val-iterations", "1", "--batch-size", "2", "--device", "cpu",
                  "--num-workers", "0", "--no-final-validation", *EXTRA.get(arch, [])]
        if (arch, config) in PATCH:
            common += ["--patch-size", PATCH[arch, config]]
        code, out = cli([*common, "--epochs", "1"], capsys)
        assert code == 0, out
        fold = wd / "results" / config / arch / "fold_0"
        code, out = cli([*common, "--epochs", "2", "--resume"], capsys)
        assert code == 0, out
        ckpt = torch.load(fold / "checkpoint_final.pt", weights_only=True)
        assert ckpt["epoch"] == 2 and ckpt["architecture"] == arch
        planned_patch = list(Plans.load(wd).configuration(config).for_architecture(arch).patch_size)
        given = [int(v) for v in PATCH[arch, config].split(",")] if (arch, config) in PATCH else None
        assert ckpt["network_kwargs"]["patch_size"] == (given or planned_patch)
        weights = {"pspnet": [1.0, 0.4], "unet": [2 / 3, 1 / 3, 0.0], "hdnet": [2 / 3, 1 / 3, 0.0]}.get(arch, [1.0])
        log = (fold / "training_log.txt").read_text()
        assert f"training outputs weighted {weights}" in log
        assert (f"auxiliary loss {AUX[arch]}" in log) if arch in AUX else ("auxiliary loss" not in log)
        assert ("aux_state" in ckpt) == (arch in AUX)  # the HFD class centres survive --resume
        if arch in AUX:
            assert ckpt["aux_state"]["centres"].shape[0] == 3 and bool(ckpt["aux_state"]["seen"].any())
        out_dir = tmp_path / f"pred_{config}"
        code, out = cli(["predict", "-m", str(wd), "-i", str(SHIPPED / "imagesTs"), "-o", str(out_dir), "--config",
                         config, "--arch", arch, "--folds", "0", "--no-tta", "--device", "cpu"], capsys)
        assert code == 0, out
        assert len(list(out_dir.glob("*.nii.gz"))) == 4


def test_resume_with_other_options_and_bad_names_are_refused(planned, tmp_path, capsys):
    wd = shutil.copytree(planned, tmp_path / "wd", ignore=shutil.ignore_patterns("results"))
    common = ["train", str(wd), "--arch", "fcn", "--features", "4,8,8,8", "--iterations-per-epoch", "1",
              "--val-iterations", "1", "--batch-size", "2", "--device", "cpu", "--num-workers", "0",
              "--no-final-validation"]
    assert cli([*common, "--epochs", "1", "--arch-option", "variant=16s"], capsys)[0] == 0
    code, out = cli([*common, "--epochs", "2", "--resume", "--arch-option", "variant=8s"], capsys)
    assert code == 2 and "variant" in out and "Traceback" not in out
    code, out = cli(["train", str(wd), "--arch", "segnte"], capsys)
    assert code == 2 and "Did you mean 'segnet'" in out and "deeplabv3plus" in out
    code, out = cli(["train", str(wd), "--arch", "fcn", "--arch-option", "variant=2s"], capsys)
    assert code == 2 and "valid: 32s, 16s, 8s" in out
    assert not (wd / "results" / "3d_fullres" / "segnte").exists()
    code, out = cli(["plan", str(SHIPPED), "-o", str(tmp_path / "w2"), "--arch", "pspnet", "--arch-option", "bins"],
                    capsys)
    assert code == 2 and "key=value" in out
    assert json.loads((wd / "plans.json").read_text())["configurations"]["3d_fullres"]["architecture"] == "pspnet"


def test_planner_turns_on_fcdensenet_checkpointing_only_where_it_helps():
    fp = synthetic_fingerprint(**CASES["isotropic"])
    tight = plan_from_fingerprint(fp, gpu_memory_gb=2.0, configs=["3d_fullres"], arch="fcdensenet")
    view = tight.configuration("3d_fullres").for_architecture("fcdensenet")
    assert view.architecture_options["checkpoint"] == "true"  # dense blocks do not fit the U-Net's patch in 2 GB
    plain = plan_from_fingerprint(fp, gpu_memory_gb=2.0, configs=["3d_fullres"], arch="fcdensenet",
                                  arch_options={"checkpoint": "false"}).configuration("3d_fullres")
    plain = plain.for_architecture("fcdensenet")
    assert torch.tensor(view.patch_size).prod() > torch.tensor(plain.patch_size).prod()
    small = synthetic_fingerprint(**CASES["small"])  # 20x24x16 images: everything fits without it
    roomy = plan_from_fingerprint(small, gpu_memory_gb=8.0, configs=["3d_fullres"], arch="fcdensenet")
    assert roomy.configuration("3d_fullres").for_architecture("fcdensenet").architecture_options["checkpoint"] == "false"
