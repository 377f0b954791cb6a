"""CUDA tests (`gpu` marker): AMP training steps, the trainer's fp16 + GradScaler path, predict on CUDA against the
CPU, and the planner's measured memory against what a planned batch uses.

Skipped, with the reason shown (`-ra`), where torch sees no CUDA device. On a GPU machine:
`python -m pytest -m gpu tests`, or `benchmarks/gpu_suite.py`, which runs them first (docs/benchmarks.md,
"GPU suite (how to run)"). Everything runs on the shipped hippocampus_mini, planned once per module on the
GPU, so the plan itself takes the measured-memory path (`medseg3d.plans.memory.cuda_trial_bytes`).
"""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)"),
]

MINI = Path(__file__).resolve().parents[1] / "medseg3d" / "resources" / "hippocampus_mini"
#: Planned-memory tolerance: the peak of a real training step at batch B lies within these factors of
#: what the planner's measured model predicts for B (a batch-2 trial step, scaled linearly).
MEMORY_TOLERANCE = (0.75, 1.33)
#: Least voxel agreement of CUDA labels with the CPU's (fp32) on a fixed, randomly initialised network: fp32
#: with TF32 off (the same arithmetic up to summation order) and fp16 autocast (`medseg3d predict` on CUDA:
#: a 10-bit mantissa flips the near-ties a random network has many of; bf16 on a CPU agreed on 0.995 of the
#: voxels of the same check). A trained model's labels are compared by benchmarks/gpu_suite.py (Dice >= 0.999).
AGREEMENT = {"fp32": 0.9999, "fp16": 0.995}


def cli(argv: list[str]) -> int:
    from medseg3d.cli import main

    try:
        main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


@pytest.fixture(scope="module")
def planned(tmp_path_factory) -> Path:
    """hippocampus_mini planned on the GPU (default budget: the GPU's memory; the measured-memory path)."""
    wd = tmp_path_factory.mktemp("gpu_work")
    assert cli(["plan", str(MINI), "-o", str(wd), "--configs", "3d_fullres"]) == 0
    return wd


def _plan(wd: Path):
    from medseg3d.plans import Plans

    plans = Plans.load(wd / "plans.json")
    return plans, plans.configuration("3d_fullres")


def _network(plans, cfg, seed: int = 0, deep_supervision: bool = True) -> torch.nn.Module:
    from medseg3d.networks import build_network

    torch.manual_seed(seed)
    return build_network(cfg.architecture, in_channels=plans.num_channels, num_classes=plans.num_classes,
                         deep_supervision=deep_supervision, **cfg.network_kwargs())


def _batch(plans, cfg, batch: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, plans.num_channels, *cfg.patch_size, generator=g)
    label = torch.randint(0, plans.num_classes, (batch, 1, *cfg.patch_size), generator=g)
    return image.to(device), label.to(device)


def _steps(net, image, label, dtype, scaler, n: int) -> list[dict]:
    """`n` training steps as the trainer takes them (autocast, deep-supervised Dice + CE, clip 12, Nesterov SGD)."""
    from medseg3d.losses import DeepSupervisionLoss, DiceCELoss

    loss_fn = DeepSupervisionLoss(DiceCELoss())
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.99, weight_decay=3e-5, nesterov=True)
    out = []
    for _ in range(n):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(image.device.type, dtype=dtype):
            outputs = net(image)
        loss = loss_fn(outputs, label)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
        else:
            loss.backward()
        grads = [p.grad for p in net.parameters() if p.grad is not None]
        finite = all(bool(torch.isfinite(g).all()) for g in grads)
        torch.nn.utils.clip_grad_norm_(net.parameters(), 12.0)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        out.append({"loss": float(loss.detach()), "grads_finite": finite, "n_grads": len(grads)})
    return out


def test_bf16_autocast_training_steps_are_finite(planned):
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    plans, cfg = _plan(planned)
    dev = torch.device("cuda")
    net = _network(plans, cfg).to(dev).train()
    before = [p.detach().clone() for p in net.parameters()]
    steps = _steps(net, *_batch(plans, cfg, cfg.batch_size, dev), torch.bfloat16, None, 3)
    assert all(math.isfinite(s["loss"]) and s["grads_finite"] and s["n_grads"] > 0 for s in steps), steps
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters())), "no parameter changed"


def test_fp16_autocast_with_grad_scaler_steps_are_finite(planned):
    """fp16 + GradScaler (the trainer's path on GPUs without bf16): steps apply, unscaled gradients finite."""
    plans, cfg = _plan(planned)
    dev = torch.device("cuda")
    net = _network(plans, cfg).to(dev).train()
    before = [p.detach().clone() for p in net.parameters()]
    scaler = torch.amp.GradScaler("cuda")
    steps = _steps(net, *_batch(plans, cfg, cfg.batch_size, dev), torch.float16, scaler, 6)
    assert all(math.isfinite(s["loss"]) for s in steps), steps
    # the scaler may skip the first steps (inf at its initial scale of 65536) and back off; later steps apply
    assert any(s["grads_finite"] for s in steps), steps
    assert steps[-1]["grads_finite"], steps
    assert 0 < scaler.get_scale() < float("inf")
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters())), "no step was applied"


def _train_rows(wd: Path, fold: int) -> list[dict]:
    found = sorted((wd / "results" / "3d_fullres").glob(f"*/fold_{fold}/metrics.csv"))
    assert found, f"no metrics.csv for fold {fold}"
    with open(found[0]) as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("bf16", [True, False], ids=["bf16-default", "fp16-gradscaler"])
def test_trainer_amp_on_cuda(planned, tmp_path, monkeypatch, bf16):
    """`medseg3d train` on CUDA at its AMP default; with bf16 reported missing, its fp16 + GradScaler path."""
    if bf16 and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    from medseg3d.training.runtime import amp_setup

    if not bf16:
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    dtype, scaler = amp_setup(torch.device("cuda"), None)
    assert dtype == (torch.bfloat16 if bf16 else torch.float16) and (scaler is None) == bf16
    wd = tmp_path / "work"
    shutil.copytree(planned, wd)
    fold = 1 if bf16 else 2
    assert cli(["train", str(wd), "--fold", str(fold), "--epochs", "2", "--iterations-per-epoch", "4",
                "--val-iterations", "1", "--num-workers", "2", "--no-final-validation", "--device", "cuda"]) == 0
    rows = _train_rows(wd, fold)
    assert len(rows) == 2
    for r in rows:
        assert math.isfinite(float(r["train_loss"])) and math.isfinite(float(r["val_loss"])), r
    ckpt = torch.load(next((wd / "results" / "3d_fullres").glob(f"*/fold_{fold}/checkpoint_latest.pt")),
                      map_location="cpu", weights_only=False)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if torch.is_floating_point(v))
    if not bf16:
        assert ckpt.get("scaler"), "the fp16 run saved no GradScaler state"


def test_predict_on_cuda_equals_cpu_on_a_fixed_network(planned, monkeypatch):
    """`predict_case` of the shipped held-out cases on CUDA (fp32 and fp16 autocast) against the CPU in fp32."""
    from medseg3d.inference.predictor import predict_case
    from medseg3d.io import read_volume

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    plans, cfg = _plan(planned)
    net = _network(plans, cfg, seed=3, deep_supervision=False).eval()
    cases = sorted((MINI / "imagesTs").glob("*.nii.gz"))[:2]
    for tta in (False, True):
        for case in cases:
            ref, _ = predict_case([net.to("cpu")], read_volume([case]), plans, "3d_fullres", use_mirroring=tta,
                                  device="cpu", precision="fp32")
            assert len(np.unique(ref)) >= 2, "the fixed network predicts one class only: the test compares nothing"
            for precision in ("fp32", "fp16"):
                seg, _ = predict_case([net.to("cuda")], read_volume([case]), plans, "3d_fullres", use_mirroring=tta,
                                      device="cuda", precision=precision)
                agree = float((seg == ref).mean())
                assert seg.shape == ref.shape and agree >= AGREEMENT[precision], (case.name, tta, precision, agree)


def test_planner_measured_memory_agrees_with_a_planned_batch(planned):
    """The plan's estimate comes from the measured (CUDA trial) model, and a real training step at the planned
    batch (and at 4x it) uses within MEMORY_TOLERANCE of what that model predicts."""
    from medseg3d.losses import DeepSupervisionLoss, DiceCELoss
    from medseg3d.plans.memory import GIB, make_memory_fn
    from medseg3d.training.runtime import amp_setup

    plans, cfg = _plan(planned)
    fn = make_memory_fn(plans.num_classes, plans.num_channels, cfg.architecture, measure_cuda=True)
    planned_bytes = fn(cfg.patch_size, cfg.strides, cfg.kernel_sizes, cfg.features, cfg.batch_size)
    estimate = float(cfg.raw["estimated_memory_gb"]) * GIB
    assert estimate == pytest.approx(planned_bytes, rel=0.02, abs=0.002 * GIB), \
        "plans.json's estimate is not the measured model's: did `medseg3d plan` skip the CUDA trial?"
    dev = torch.device("cuda")
    dtype, scaler = amp_setup(dev, None)
    torch.backends.cudnn.benchmark = True  # as the trainer sets it on CUDA
    ratios = {}
    for batch in (cfg.batch_size, 4 * cfg.batch_size):
        predicted = fn(cfg.patch_size, cfg.strides, cfg.kernel_sizes, cfg.features, batch)
        net = _network(plans, cfg).to(dev).train()
        image, label = _batch(plans, cfg, batch, dev)
        loss_fn = DeepSupervisionLoss(DiceCELoss())
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.99, nesterov=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()  # the peak counts weights and batch, as the trial's does
        for _ in range(2):  # the second step has the optimiser's momentum allocated
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=dtype):
                outputs = net(image)
            loss = loss_fn(outputs, label)
            (scaler.scale(loss) if scaler is not None else loss).backward()
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
        torch.cuda.synchronize()
        ratios[batch] = torch.cuda.max_memory_allocated() / predicted
        del net, image, label, opt, outputs, loss
        torch.cuda.empty_cache()
    lo, hi = MEMORY_TOLERANCE
    assert all(lo <= r <= hi for r in ratios.values()), f"peak / predicted per batch: {ratios}"
