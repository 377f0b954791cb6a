import numpy as np

from medseg3d.data.sampling import choose_corner, crop_padded, num_forced_fg, patch_bounds, sample_patch


def _case(shape=(20, 24, 16), seed=0):
    rng = np.random.default_rng(seed)
    data = rng.normal(size=(2, *shape)).astype(np.float32)
    seg = np.zeros(shape, np.int8)
    seg[2:4, 3:5, 1:3] = 1
    seg[15:17, 18:20, 12:14] = 2
    locs = {str(c): np.argwhere(seg == c).tolist() for c in (1, 2)}
    return data, seg, {"class_locations": locs}


def test_forced_foreground_patches_contain_each_class_evenly():
    data, seg, props = _case()
    rng = np.random.default_rng(0)
    hits = {1: 0, 2: 0}
    for _ in range(200):
        img, lab = sample_patch(data, seg, props, (8, 8, 8), rng, force_fg=True)
        assert img.shape == (2, 8, 8, 8) and lab.shape == (8, 8, 8)
        present = set(np.unique(lab).tolist()) - {0}
        assert present, "a forced-foreground patch must contain foreground"
        for c in present:
            hits[c] += 1
    assert 70 < hits[1] < 130 and 70 < hits[2] < 130


def test_random_patch_inside_image_and_matches_source():
    data, seg, props = _case()
    rng = np.random.default_rng(1)
    for _ in range(50):
        c = choose_corner(seg.shape, (8, 8, 8), rng)
        assert (c >= 0).all() and (c + 8 <= np.array(seg.shape)).all()
    c = np.array([3, 4, 5])
    np.testing.assert_array_equal(crop_padded(data, c, (8, 8, 8)), data[:, 3:11, 4:12, 5:13])


def test_padding_when_patch_exceeds_image():
    data, seg, props = _case(shape=(6, 24, 16))
    lo, hi = patch_bounds(seg.shape, (10, 8, 8))
    assert lo[0] == -2 and hi[0] == -2
    img, lab = sample_patch(data, seg, props, (10, 8, 8), np.random.default_rng(0))
    assert img.shape == (2, 10, 8, 8)
    assert (img[:, :2] == 0).all() and (img[:, -2:] == 0).all() and (lab[:2] == 0).all()


def test_2d_slices_along_slice_axis():
    data, seg, props = _case()
    rng = np.random.default_rng(2)
    img, lab = sample_patch(data, seg, props, (12, 8), rng, force_fg=True, slice_axis=1)
    assert img.shape == (2, 12, 8) and lab.shape == (12, 8)
    assert (lab > 0).any()


def test_num_forced_fg():
    assert num_forced_fg(2, 0.33) == 1
    assert num_forced_fg(7, 0.33) == 2
    assert num_forced_fg(9, 0.33) == 3
    assert num_forced_fg(4, 0.0) == 0


def _tiny_cache(tmp_path, n=3):
    import json

    d = tmp_path / "preprocessed" / "3d_fullres"
    d.mkdir(parents=True)
    for i in range(n):
        data, seg, props = _case(seed=i)
        np.save(d / f"c{i}.npy", data)
        np.save(d / f"c{i}_seg.npy", seg)
        (d / f"c{i}.json").write_text(json.dumps(props))
    return [f"c{i}" for i in range(n)]


def test_loader_worker_batches_and_reports_worker_errors(tmp_path):
    import pytest

    from medseg3d.data.augment import AugmentParams
    from medseg3d.data.loader import StreamSpec, make_loader, next_batch
    from medseg3d.errors import MedsegError

    cases = _tiny_cache(tmp_path)
    spec = StreamSpec(tmp_path, "3d_fullres", cases, (8, 8, 8), 3, augment=AugmentParams(mirror_axes=(0, 1, 2)), seed=1)
    it = iter(make_loader(spec, num_workers=1))
    for _ in range(3):
        img, lab = next_batch(it)
        assert img.shape == (3, 2, 8, 8, 8) and lab.shape == (3, 1, 8, 8, 8)
        assert (lab[-1] > 0).any()  # the last patch of each batch is centred on foreground
    bad = StreamSpec(tmp_path, "3d_fullres", ["missing_case"], (8, 8, 8), 2, seed=1)
    with pytest.raises(MedsegError, match="missing_case"):
        next_batch(iter(make_loader(bad, num_workers=1)))
