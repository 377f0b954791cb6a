"""Pure pieces of model selection: averaging, argmax, error focus, worst cases, the overlay PNG."""

from __future__ import annotations

import numpy as np
import pytest

from medseg3d.errors import InputError
from medseg3d.evaluation.overlays import error_focus, worst_cases, write_overlay
from medseg3d.evaluation.selection import postprocessed_case_dice
from medseg3d.inference.ensemble import average_probabilities, labels_from_probabilities, read_probabilities


def test_average_is_the_float32_mean_in_order_and_refuses_other_shapes():
    rng = np.random.default_rng(0)
    a, b = rng.random((3, 20, 4, 5), dtype=np.float32), rng.random((3, 20, 4, 5), dtype=np.float32)
    out = average_probabilities(iter([a, b]))
    assert out.dtype == np.float32 and np.array_equal(out, (a + b) / np.float32(2))
    assert np.array_equal(labels_from_probabilities(out), np.argmax(out, 0))
    with pytest.raises(ValueError, match="differ in shape"):
        average_probabilities([a, b[:, :10]])


def test_unreadable_npz_names_the_file(tmp_path):
    bad = tmp_path / "case.npz"
    bad.write_bytes(b"junk")
    with pytest.raises(InputError, match="case.npz is not a readable .npz"):
        read_probabilities(bad)


def test_error_focus_lies_in_the_largest_error_component():
    ref = np.zeros((10, 12, 8), np.uint8)
    pred = ref.copy()
    pred[1, 1, 1] = 1              # a one-voxel error
    pred[5:8, 6:9, 3:6] = 2        # a 27-voxel error
    x, y, z = error_focus(ref, pred)
    assert (x, y, z) == (6, 7, 4)
    assert error_focus(ref, ref) == (5, 6, 4)  # no error, no foreground: the centre


def test_worst_cases_and_overlay_png(tmp_path):
    assert worst_cases({"a": 0.9, "b": 0.1, "c": 0.5, "d": 0.1}, 3) == ["b", "d", "c"]
    rng = np.random.default_rng(1)
    ref = np.zeros((9, 10, 11), np.uint8)
    ref[2:6, 3:7, 4:8] = 1
    pred = np.roll(ref, 1, axis=0)
    path = write_overlay(rng.random(ref.shape).astype(np.float32), ref, pred, (1.0, 1.0, 2.5), tmp_path / "o.png", "t")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_postprocessed_dice_follows_the_decision():
    v = {"base": {1: 0.1, 2: 0.2}, "fg": {1: 0.3, 2: 0.4}, "cls_base": {1: 0.5, 2: 0.6}, "cls_fg": {1: 0.7, 2: 0.8}}
    dec = {"largest_component_foreground": True, "largest_component_classes": [2]}
    assert postprocessed_case_dice(v, dec, [1, 2]) == {1: 0.3, 2: 0.8}
    dec = {"largest_component_foreground": False, "largest_component_classes": [1]}
    assert postprocessed_case_dice(v, dec, [1, 2]) == {1: 0.5, 2: 0.2}
