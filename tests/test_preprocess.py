"""Crop, resample, normalise, the per-case pipeline, the cache, and resumable dataset preprocessing."""

from __future__ import annotations

import numpy as np
import pytest

from medseg3d.io import Volume, load_dataset
from medseg3d.plans import ConfigurationPlan
from medseg3d.preprocess import (
    compute_new_shape,
    is_cached,
    list_cached_cases,
    load_case,
    preprocess_case,
    resample_data,
    resample_seg,
    seg_to_original,
)
from medseg3d.preprocess.crop import crop_to_nonzero, uncrop
from medseg3d.preprocess.normalize import normalize
from medseg3d.preprocess.resample import separate_axis_for
from medseg3d.preprocess.run import preprocess_dataset
from tests._synth import SHIPPED, make_msd


def config(spacing=(1.0, 1.0, 1.0), scheme="zscore", separate_axis=None, label_mode="linear_onehot"):
    return ConfigurationPlan("3d_fullres", {
        "dims": 3, "spacing": list(spacing), "slice_axis": None, "data_identifier": "3d_fullres",
        "patch_size": [16, 16, 16], "batch_size": 2, "strides": [[1, 1, 1], [2, 2, 2]],
        "kernel_sizes": [[3, 3, 3], [3, 3, 3]], "features": [32, 64],
        "normalization": [{"scheme": scheme, "mean": 10.0, "std": 5.0, "lower": 0.0, "upper": 40.0}],
        "architecture": "unet", "mirror_axes": [0, 1, 2], "median_shape": [32, 32, 32],
        "resampling": {"image_order": 3, "label_mode": label_mode, "separate_axis": separate_axis},
        "previous_stage": None, "next_stage": None,
    })


def smooth_label(shape, spacing):
    """Two nested ellipsoids (labels 1 and 2) defined in mm, so they are the same object at any spacing."""
    grid = np.stack(np.meshgrid(*[(np.arange(n) + 0.5) * s for n, s in zip(shape, spacing)], indexing="ij"), -1)
    centre = np.array(shape) * np.array(spacing) / 2
    r = np.sqrt((((grid - centre) / np.array([14.0, 11.0, 12.0])) ** 2).sum(-1))
    return ((r <= 1).astype(np.int8) + (r <= 0.5)).astype(np.int8)


def dice(a, b):
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_compute_new_shape_and_separate_axis():
    assert compute_new_shape((100, 100, 20), (0.7, 0.7, 5.0), (1.0, 1.0, 2.5)) == (70, 70, 40)
    assert separate_axis_for((0.7, 0.7, 5.0), (1.0, 1.0, 1.0)) == 2
    assert separate_axis_for((1.0, 1.0, 1.0), (4.0, 1.0, 1.0)) == 0
    assert separate_axis_for((1.0, 1.0, 2.0), (1.0, 1.0, 1.5)) is None


@pytest.mark.parametrize("mode", ["linear_onehot", "nearest"])
@pytest.mark.parametrize("spacing,target,sep", [((1.0, 1.0, 1.0), (0.5, 0.5, 0.5), None),
                                               ((0.7, 0.7, 3.0), (0.7, 0.7, 1.0), 2)])
def test_label_resample_roundtrip_dice(mode, spacing, target, sep):
    shape = tuple(int(round(40 / s)) for s in spacing)
    seg = smooth_label(shape, spacing)
    new_shape = compute_new_shape(shape, spacing, target)
    up = resample_seg(seg, new_shape, 3, mode=mode, separate_axis=sep)
    back = resample_seg(up, shape, 3, mode=mode, separate_axis=sep)
    assert up.dtype == seg.dtype and back.shape == seg.shape
    for c in (1, 2):
        assert dice(back == c, seg == c) > 0.99, (mode, c)
    # at the target spacing the object matches the same object drawn there
    ref = smooth_label(new_shape, target)
    assert dice(up > 0, ref > 0) > 0.95


def test_resample_data_shapes_and_identity():
    rng = np.random.default_rng(0)
    data = rng.normal(size=(2, 10, 12, 8)).astype(np.float32)
    assert resample_data(data, (10, 12, 8)) is data or np.array_equal(resample_data(data, (10, 12, 8)), data)
    out = resample_data(data, (20, 24, 4), separate_axis=2)
    assert out.shape == (2, 20, 24, 4) and out.dtype == np.float32
    smooth = np.broadcast_to(np.linspace(0, 1, 12)[None, None, :, None], (1, 10, 12, 8)).astype(np.float32)
    up = resample_data(smooth, (10, 24, 8), order=3)
    assert up.min() >= -0.05 and up.max() <= 1.05 and np.all(np.diff(up[0, 5, :, 3]) >= -1e-4)


def test_crop_and_uncrop():
    data = np.zeros((2, 10, 12, 14), np.float32)
    data[0, 2:5, 3:9, 4:6] = 1
    data[1, 7, 1, 10] = 2
    seg = (data[0] > 0).astype(np.int8)
    dc, sc, bbox = crop_to_nonzero(data, seg)
    assert bbox == [[2, 8], [1, 9], [4, 11]]
    assert dc.shape == (2, 6, 8, 7) and sc.shape == (6, 8, 7)
    assert np.array_equal(uncrop(dc, bbox, (10, 12, 14)), data)


def test_normalize_schemes():
    x = np.array([[[[-10.0, 0.0, 10.0, 50.0]]]], np.float32)
    z = normalize(x, [{"scheme": "zscore"}])
    assert abs(z.mean()) < 1e-6 and abs(z.std() - 1) < 1e-5
    ct = normalize(x, [{"scheme": "ct", "mean": 10.0, "std": 5.0, "lower": 0.0, "upper": 40.0}])
    assert np.allclose(ct, [[[[-2.0, -2.0, 0.0, 6.0]]]])
    r = normalize(x, [{"scheme": "rescale", "lower": 0.0, "upper": 40.0}])
    assert np.allclose(r, [[[[0.0, 0.0, 0.25, 1.0]]]])
    assert np.array_equal(normalize(x, [{"scheme": "none"}]), x)


def test_preprocess_case_properties_and_inverse():
    spacing = (0.8, 0.8, 2.0)
    shape = (50, 50, 20)
    seg = np.zeros(shape, np.int8)
    seg[5:45, 5:45, 2:18] = smooth_label((40, 40, 16), spacing)
    img = np.zeros((1, *shape), np.float32)
    img[0, 3:47, 4:48, 1:19] = 10 + 5 * seg[3:47, 4:48, 1:19]
    affine = np.diag([*spacing, 1.0])
    pc = preprocess_case(Volume(img, affine), config((1.0, 1.0, 1.0)), Volume(seg[None], affine), classes=[1, 2, 3])
    p = pc.properties
    assert p["bbox"] == [[3, 47], [4, 48], [1, 19]]
    assert p["shape_after_crop"] == [44, 44, 18]
    assert p["shape_after_resample"] == list(compute_new_shape((44, 44, 18), spacing, (1, 1, 1)))
    assert pc.data.shape == (1, *p["shape_after_resample"]) and pc.data.dtype == np.float32
    assert pc.seg.shape == tuple(p["shape_after_resample"]) and pc.seg.dtype == np.int8
    assert p["class_locations"]["3"] == []
    for c in ("1", "2"):
        locs = np.array(p["class_locations"][c])
        assert len(locs) > 0 and np.all(pc.seg[tuple(locs.T)] == int(c))
    back = seg_to_original(pc.seg, p)
    assert back.shape == shape
    assert dice(back > 0, seg > 0) > 0.97


def test_cache_resumes_after_interruption(tmp_path):
    spec = load_dataset(make_msd(tmp_path / "data", n_cases=4))
    from medseg3d.fingerprint import compute_fingerprint
    from medseg3d.plans.planner import plan_from_fingerprint

    plans = plan_from_fingerprint(compute_fingerprint(spec), configs=["3d_fullres"])
    work = tmp_path / "work"
    rep = preprocess_dataset(spec.cases, plans, work, workers=1)
    assert rep.written == {"3d_fullres": 4} and rep.total_bytes > 0
    assert list_cached_cases(work, "3d_fullres") == [c.name for c in spec.cases]
    data, seg, props = load_case(work, "3d_fullres", "case_001")
    assert isinstance(data, np.memmap) and data.shape[1:] == seg.shape == tuple(props["shape_after_resample"])
    # an interrupted run: a truncated array and a missing properties file
    npy = work / "preprocessed" / "3d_fullres" / "case_001.npy"
    npy.write_bytes(npy.read_bytes()[:200])
    (work / "preprocessed" / "3d_fullres" / "case_002.json").unlink()
    assert not is_cached(work, "3d_fullres", "case_001") and not is_cached(work, "3d_fullres", "case_002")
    rep2 = preprocess_dataset(spec.cases, plans, work, workers=1)
    assert rep2.written == {"3d_fullres": 2} and rep2.skipped == {"3d_fullres": 2}
    assert all(is_cached(work, "3d_fullres", c.name) for c in spec.cases)
    assert not list((work / "preprocessed" / "3d_fullres").glob(".case*"))  # no temporary files left


def test_shipped_case_through_pipeline():
    spec = load_dataset(SHIPPED)
    case = spec.cases[0]
    from medseg3d.io import read_label, read_volume

    img, lab = read_volume(case.images), read_label(case.label)
    pc = preprocess_case(img, config(), lab, classes=[1, 2])
    assert pc.data.shape[1:] == pc.seg.shape
    assert set(np.unique(pc.seg)) <= {0, 1, 2}
    assert abs(float(pc.data.mean())) < 1e-3


def test_zscore_inside_mask_leaves_background_zero():
    data = np.zeros((1, 12, 12, 12), np.float32)
    data[0, 2:10, 2:10, 2:10] = np.random.default_rng(0).normal(100, 10, (8, 8, 8))
    mask = data[0] != 0
    out = normalize(data, [{"scheme": "zscore", "use_mask": True}], mask)
    assert np.all(out[0][~mask] == 0)
    assert abs(out[0][mask].mean()) < 1e-4 and abs(out[0][mask].std() - 1) < 1e-3
    plain = normalize(data, [{"scheme": "zscore", "use_mask": False}], mask)
    assert plain[0][~mask].min() < -0.5  # without the mask the background moves


def test_planner_sets_use_mask_for_heavily_cropped_data():
    from medseg3d.plans import rules

    norm = rules.normalization_for(["T1", "CT"], {}, relative_size_after_crop=0.5)
    assert [n["use_mask"] for n in norm] == [True, False]
    assert rules.normalization_for(["T1"], {}, relative_size_after_crop=0.9)[0]["use_mask"] is False


def test_probs_to_original_anisotropic():
    from medseg3d.preprocess import probs_to_original

    spacing, shape = (0.7, 0.7, 3.5), (40, 40, 12)
    seg = np.zeros(shape, np.int8)
    seg[4:36, 4:36, 1:11] = smooth_label((32, 32, 10), spacing)
    img = np.zeros((1, *shape), np.float32)
    img[0, 2:38, 3:37, :] = 5 + seg[2:38, 3:37, :]
    affine = np.diag([*spacing, 1.0])
    pc = preprocess_case(Volume(img, affine), config((1.0, 1.0, 1.0)), Volume(seg[None], affine))
    onehot = np.stack([(pc.seg == c) for c in range(3)]).astype(np.float32)
    probs = probs_to_original(onehot, pc.properties)
    assert probs.shape == (3, *shape)
    assert np.allclose(probs[:, :2].sum(0), [[1.0]])  # outside the crop: background probability 1
    back = probs.argmax(0)
    assert dice(back > 0, seg > 0) > 0.95


def test_cache_stores_float16_unless_values_do_not_fit(tmp_path):
    from medseg3d.preprocess.cache import is_cached, load_case, save_case

    props = {"shape_after_resample": [4, 5, 6]}
    small = np.random.default_rng(0).normal(size=(1, 4, 5, 6)).astype(np.float32)
    save_case(tmp_path, "3d_fullres", "a", small, np.zeros((4, 5, 6), np.int8), props)
    d, _, _ = load_case(tmp_path, "3d_fullres", "a")
    assert d.dtype == np.float16 and np.allclose(d, small, rtol=1e-3, atol=1e-3)
    raw = small * 1e5  # unnormalised intensities beyond float16's range stay float32
    save_case(tmp_path, "3d_fullres", "b", raw, np.zeros((4, 5, 6), np.int8), props)
    d, _, _ = load_case(tmp_path, "3d_fullres", "b")
    assert d.dtype == np.float32 and np.array_equal(d, raw)
    assert is_cached(tmp_path, "3d_fullres", "a") and is_cached(tmp_path, "3d_fullres", "b")


def test_cubic_resampling_equals_scipy_zoom_with_float32_prefilter():
    """Our in-place float32 prefilter + affine pass gives scipy zoom's cubic result (which prefilters in float64)."""
    from scipy import ndimage

    from medseg3d.preprocess.resample import resample_data

    rng = np.random.default_rng(3)
    img = ndimage.gaussian_filter(rng.normal(size=(23, 31, 17)), 1.5).astype(np.float32)
    for new in [(40, 20, 17), (23, 31, 9), (11, 62, 30)]:
        ref = ndimage.zoom(img, [n / o for n, o in zip(new, img.shape)], order=3, mode="nearest", grid_mode=True)
        got = resample_data(img[None], new, order=3)[0]
        assert got.dtype == np.float32 and got.shape == new
        assert np.abs(got - ref).max() < 1e-5 * max(1.0, np.abs(ref).max())


@pytest.mark.parametrize("sep", [None, 0, 2])
@pytest.mark.parametrize("new", [(40, 20, 17), (23, 31, 9), (11, 62, 30), (7, 5, 3)])
def test_linear_rows_slabs_equal_the_whole_linear_resampling(new, sep):
    """Slab-wise linear resampling (the export path) equals the two-pass whole-volume one, any slab size."""
    from medseg3d.preprocess.resample import linear_rows, resample_data

    rng = np.random.default_rng(5)
    img = rng.random((23, 31, 17)).astype(np.float16)
    ref = resample_data(img[None], new, order=1, separate_axis=sep, order_axis=1)[0]
    for rows in (1, 3, new[0]):
        got = np.concatenate([linear_rows(img, new, a, min(new[0], a + rows)) for a in range(0, new[0], rows)])
        assert got.dtype == np.float32 and got.shape == new
        np.testing.assert_allclose(got, ref, atol=2e-6)
