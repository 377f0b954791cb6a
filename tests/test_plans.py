"""Planning rules, golden plans for synthetic fingerprints, and the plans.json schema."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from medseg3d.errors import ConfigError, PlanError
from medseg3d.plans import Plans, rules
from medseg3d.plans.memory import GIB, activation_elements, analytic_bytes, make_memory_fn
from medseg3d.plans.planner import plan_from_fingerprint

GOLDEN = Path(__file__).parent / "golden"


def synthetic_fingerprint(spacing, shape, n_cases=40, channels=("MRI",), labels=3, seed=0, jitter=0.1):
    """A fingerprint as `medseg3d.fingerprint` writes it, with seeded spread around spacing/shape."""
    rng = np.random.default_rng(seed)
    cases, spacings, shapes = [], [], []
    for i in range(n_cases):
        sp = [float(round(s * rng.uniform(1 - jitter, 1 + jitter), 3)) for s in spacing]
        sh = [max(1, int(round(s * rng.uniform(1 - jitter, 1 + jitter)))) for s in shape]
        cases.append({"name": f"c{i:03d}", "spacing": sp, "shape": sh, "shape_after_crop": sh,
                      "class_voxels": {"0": 100, "1": 10}})
        spacings.append(sp)
        shapes.append(sh)
    stats = {"mean": 50.0, "std": 20.0, "median": 48.0, "min": -1000.0, "max": 3000.0,
             "percentile_00_5": -100.0, "percentile_99_5": 300.0}
    return {
        "dataset_name": "synthetic", "num_cases": n_cases, "channel_names": list(channels),
        "labels": {str(k): f"l{k}" for k in range(labels)}, "cases": cases, "spacings": spacings,
        "shapes_after_crop": shapes,
        "foreground_intensity_properties_per_channel": {str(c): dict(stats) for c in range(len(channels))},
        "median_relative_size_after_cropping": 1.0,
    }


CASES = {
    "isotropic": dict(spacing=(1.0, 1.0, 1.0), shape=(160, 160, 160)),
    "anisotropic": dict(spacing=(0.7, 0.7, 5.0), shape=(512, 512, 40)),
    "thin2d": dict(spacing=(0.5, 0.5, 1.0), shape=(512, 512, 1)),
    "small": dict(spacing=(1.0, 1.0, 1.0), shape=(20, 24, 16), n_cases=10),
    "ct_mr": dict(spacing=(0.8, 0.8, 1.5), shape=(256, 256, 120), channels=("CT", "T2")),
}


def _plan(name):
    return plan_from_fingerprint(synthetic_fingerprint(**CASES[name]), gpu_memory_gb=8.0)


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_plans(name):
    """A silent change of a planning rule changes one of these files (MEDSEG3D_UPDATE_GOLDEN=1 rewrites them)."""
    got = _plan(name).to_dict()
    got.pop("medseg3d_version")
    path = GOLDEN / f"plans_{name}.json"
    if os.environ.get("MEDSEG3D_UPDATE_GOLDEN") == "1":
        path.write_text(json.dumps(got, indent=1) + "\n")
    expected = json.loads(path.read_text())
    assert got == expected


@pytest.mark.parametrize("name", sorted(CASES))
def test_plan_properties(name):
    fp = synthetic_fingerprint(**CASES[name])
    plans = plan_from_fingerprint(fp, gpu_memory_gb=8.0)
    med = np.median(fp["shapes_after_crop"], 0)
    for cfg in plans.configurations.values():
        assert cfg.batch_size >= 2
        assert len(cfg.strides) == len(cfg.kernel_sizes) == len(cfg.features)
        assert cfg.strides[0] == [1] * cfg.dims
        for axis, pools in enumerate(cfg.pools_per_axis):
            assert cfg.patch_size[axis] % (2**pools) == 0
        n_vox = float(np.prod(cfg.median_shape)) * fp["num_cases"]
        cap = round(n_vox * 0.05 / np.prod(cfg.patch_size))
        assert cfg.batch_size <= max(2, cap)
        assert cfg.features[0] == 32 and max(cfg.features) <= (320 if cfg.dims == 3 else 512)
        assert len(cfg.normalization) == len(fp["channel_names"])
    assert "2d" in plans.configurations
    if med.min() > 1:
        assert "3d_fullres" in plans.configurations


def test_hippocampus_like_matches_nnunet():
    """nnU-Net v2 on Task04 (median 35x50x36 at 1 mm, 208 cases, 3 classes): 40x56x40, 4 stages, batch 7."""
    fp = synthetic_fingerprint((1.0, 1.0, 1.0), (35, 50, 36), n_cases=208, jitter=0.0)
    cfg = plan_from_fingerprint(fp, gpu_memory_gb=8.0).configuration("3d_fullres")
    assert cfg.patch_size == (40, 56, 40)
    assert cfg.strides == [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
    assert cfg.features == [32, 64, 128, 256]
    assert cfg.batch_size == 7


def test_target_spacing_anisotropy_rule():
    sp = [[0.7, 0.7, s] for s in [5.0] * 8 + [2.5, 3.0]]
    shapes = [[512, 512, 40]] * 10
    t = rules.target_spacing(sp, shapes)
    assert t[:2] == [0.7, 0.7]
    assert t[2] == pytest.approx(np.percentile([s[2] for s in sp], 10))
    # same spacings but as many voxels along the coarse axis: the median stays
    assert rules.target_spacing(sp, [[512, 512, 512]] * 10)[2] == 5.0


def test_pool_and_conv_props_anisotropic():
    pools, strides, kernels, patch, div = rules.pool_and_conv_props([0.7, 0.7, 5.0], [300, 300, 20])
    assert strides[1] == [2, 2, 1]  # the coarse axis waits until the others are within 2x
    assert kernels[0] == [3, 3, 1]
    assert all(p % d == 0 for p, d in zip(patch, div))
    assert pools[2] < pools[0]


def test_normalization_schemes():
    props = {"0": {"mean": 1.0, "std": 2.0, "percentile_00_5": -5.0, "percentile_99_5": 5.0}}
    props["1"] = props["2"] = props["3"] = props["0"]
    norm = rules.normalization_for(["CT", "T2", "noNorm", "rescale_to_0_1"], props)
    assert [n["scheme"] for n in norm] == ["ct", "zscore", "none", "rescale"]
    assert norm[0]["lower"] == -5.0 and norm[0]["upper"] == 5.0


def test_memory_budget_changes_batch_not_below_two():
    fp = synthetic_fingerprint((1.0, 1.0, 1.0), (160, 160, 160), n_cases=400)
    small = plan_from_fingerprint(fp, gpu_memory_gb=4.0).configuration("3d_fullres")
    big = plan_from_fingerprint(fp, gpu_memory_gb=40.0).configuration("3d_fullres")
    assert np.prod(small.patch_size) < np.prod(big.patch_size)
    assert small.batch_size >= 2
    fn = make_memory_fn(3, 1)
    assert fn(small.patch_size, small.strides, small.kernel_sizes, small.features, 2) <= 4.0 * GIB


def test_activation_elements_counts_by_hand():
    # one stage of 2 convs (8 ch on 4x4x4) + one pooled stage (16 ch on 2x2x2); decoder: 2 convs + tconv + head
    n = activation_elements([4, 4, 4], [[1, 1, 1], [2, 2, 2]], [8, 16], num_classes=2)
    assert n == 2 * 8 * 64 + 2 * 16 * 8 + 2 * 8 * 64 + 8 * 64 + 2 * 64
    assert analytic_bytes([4, 4, 4], [[1, 1, 1], [2, 2, 2]], [8, 16], 4, 2) == pytest.approx(
        4 * analytic_bytes([4, 4, 4], [[1, 1, 1], [2, 2, 2]], [8, 16], 1, 2))


def test_lowres_planned_for_large_images():
    plans = plan_from_fingerprint(synthetic_fingerprint((1.0, 1.0, 1.0), (400, 400, 400)), gpu_memory_gb=8.0)
    assert {"3d_lowres", "3d_cascade_fullres"} <= set(plans.configurations)
    low = plans.configuration("3d_lowres")
    assert low.next_stage == "3d_cascade_fullres"
    assert plans.configuration("3d_cascade_fullres").previous_stage == "3d_lowres"
    assert low.spacing[0] > plans.configuration("3d_fullres").spacing[0]


def test_2d_slice_axis():
    assert rules.slice_axis_2d([0.7, 0.7, 5.0], [512, 512, 40]) == 2
    assert rules.slice_axis_2d([5.0, 0.7, 0.7], [40, 512, 512]) == 0
    assert rules.slice_axis_2d([1.0, 1.0, 1.0], [100, 100, 100]) == 2
    plans = _plan("anisotropic")
    c2 = plans.configuration("2d")
    assert c2.slice_axis == 2 and c2.in_plane_axes == (0, 1)
    # nnU-Net's 2d rule: its own cache, the slice axis at each case's native spacing
    assert c2.data_identifier == "2d" != plans.configuration("3d_fullres").data_identifier
    assert c2.native_spacing_axis == 2 and plans.configuration("3d_fullres").native_spacing_axis is None
    assert c2.target_spacing((0.5, 0.6, 4.7))[2] == 4.7
    assert c2.target_spacing((0.5, 0.6, 4.7))[:2] == c2.spacing[:2]


def test_schema_roundtrip_and_refusals(tmp_path):
    plans = _plan("isotropic")
    p = tmp_path / "plans.json"
    plans.save(p)
    again = Plans.load(p)
    assert again.network_hash("3d_fullres") == plans.network_hash("3d_fullres")
    assert Plans.load(tmp_path).configuration("3d_fullres").network_kwargs()["dims"] == 3
    assert again.num_classes == 3 and again.channel_names == ["MRI"]
    with pytest.raises(ConfigError, match="valid: 2d, 3d_fullres"):
        again.configuration("3d_hires")
    raw = json.loads(p.read_text())
    raw["schema_version"] = 99
    p.write_text(json.dumps(raw))
    with pytest.raises(PlanError, match="newer"):
        Plans.load(p)
    p.write_text("{not json")
    with pytest.raises(PlanError, match="medseg3d plan"):
        Plans.load(p)
    with pytest.raises(PlanError, match="no plans file"):
        Plans.load(tmp_path / "missing.json")


def test_plan_hash_changes_with_content():
    a, b = _plan("isotropic"), _plan("small")
    assert a.network_hash("3d_fullres") != b.network_hash("3d_fullres") and len(a.network_hash("3d_fullres")) == 64


def test_2d_files_refused_with_the_fix():
    fp = synthetic_fingerprint((1.0, 1.0, 1.0), (64, 64, 1))
    fp["spacings"] = [s[:2] for s in fp["spacings"]]
    with pytest.raises(PlanError, match="3D NIfTI with one slice"):
        plan_from_fingerprint(fp)


@pytest.mark.gpu
def test_cuda_trial_measures_memory():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from medseg3d.plans.memory import cuda_trial_bytes

    strides, kernels, feats = [[1, 1, 1], [2, 2, 2], [2, 2, 2]], [[3, 3, 3]] * 3, [32, 64, 128]
    small = cuda_trial_bytes("unet", [32, 32, 32], strides, kernels, feats, 2, 1, 3)
    big = cuda_trial_bytes("unet", [64, 64, 64], strides, kernels, feats, 2, 1, 3)
    assert 0 < small < big < float("inf")
    model = analytic_bytes([64, 64, 64], strides, feats, 2, 3)
    assert model / 3 < big < model * 3  # the analytic constant is within 3x of the measured peak


def test_trial_step_runs_the_planned_network_on_cpu():
    """The step the CUDA trial measures, run on CPU with the network a small plan describes."""
    from medseg3d.plans.memory import build_trial_network, trial_step

    torch.set_num_threads(1)
    cfg = _plan("small").configuration("3d_fullres")
    net = build_trial_network("unet", cfg.patch_size, cfg.strides, cfg.kernel_sizes, cfg.features, 1, 3)
    trial_step(net, 2, 1, cfg.patch_size, torch.device("cpu"), torch.bfloat16)
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
