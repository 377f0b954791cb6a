"""Largest-component postprocessing, its decision file, and the greedy choice on cross-validation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medseg3d.errors import InputError
from medseg3d.evaluation.choose_postprocessing import decide, variant_dice
from medseg3d.postprocess import apply_postprocessing, largest_component, load_postprocessing


def _two_blobs() -> np.ndarray:
    seg = np.zeros((12, 12, 12), np.int16)
    seg[1:4, 1:4, 1:4] = 1  # 27 voxels of class 1
    seg[4:6, 1:4, 1:4] = 2  # 18 voxels of class 2 touching class 1 (same foreground component)
    seg[9:11, 9:11, 9:11] = 1  # 8 voxels of class 1, separate
    seg[11, 0, 11] = 2  # 1 stray voxel of class 2
    return seg


def test_largest_component_uses_full_connectivity():
    mask = np.zeros((5, 5, 5), bool)
    mask[0, 0, 0] = mask[1, 1, 1] = mask[2, 2, 2] = True  # corner-connected diagonal
    mask[4, 4, 0] = True
    out = largest_component(mask)
    assert out.sum() == 3 and not out[4, 4, 0]
    assert not largest_component(np.zeros((3, 3, 3), bool)).any()


def test_apply_foreground_then_class():
    seg = _two_blobs()
    fg = apply_postprocessing(seg, {"largest_component_foreground": True, "largest_component_classes": []})
    assert (fg == 1).sum() == 27 and (fg == 2).sum() == 18
    cls = apply_postprocessing(seg, {"largest_component_foreground": False, "largest_component_classes": [2]})
    assert (cls == 1).sum() == 35 and (cls == 2).sum() == 18
    assert np.array_equal(apply_postprocessing(seg, None), seg)
    assert (seg == 1).sum() == 35  # input untouched


def test_load_postprocessing(tmp_path):
    assert load_postprocessing(tmp_path) is None
    decision = {"largest_component_foreground": True, "largest_component_classes": [2], "dice_before": 0.5,
                "dice_after": 0.6}
    (tmp_path / "postprocessing.json").write_text(json.dumps(decision))
    assert load_postprocessing(tmp_path) == decision
    (tmp_path / "postprocessing.json").write_text('{"largest_component_foreground": "yes"}')
    with pytest.raises(InputError, match="postprocessing.json"):
        load_postprocessing(tmp_path)
    (tmp_path / "postprocessing.json").write_text("{not json")
    with pytest.raises(InputError, match="not readable JSON"):
        load_postprocessing(tmp_path)


def test_variant_dice_by_hand():
    ref = _two_blobs()
    ref[9:11, 9:11, 9:11] = 0
    ref[11, 0, 11] = 0  # reference: just the two touching blobs
    v = variant_dice(ref, _two_blobs(), [1, 2])
    assert v["base"][1] == pytest.approx(2 * 27 / (27 + 35))
    assert v["base"][2] == pytest.approx(2 * 18 / (18 + 19))
    assert v["fg"] == {1: 1.0, 2: 1.0}
    assert v["cls_base"][1] == pytest.approx(1.0) and v["cls_base"][2] == pytest.approx(1.0)


def test_decide_keeps_only_steps_that_raise_dice():
    # foreground step lowers class 2; per class, only class 1 gains on top of the raw prediction
    cases = [
        {"base": {1: 0.8, 2: 0.9}, "fg": {1: 0.85, 2: 0.7}, "cls_base": {1: 0.9, 2: 0.9}, "cls_fg": {1: 0.9, 2: 0.7}},
        {"base": {1: 0.6, 2: 0.9}, "fg": {1: 0.65, 2: 0.7}, "cls_base": {1: 0.7, 2: 0.85}, "cls_fg": {1: 0.7, 2: 0.7}},
    ]
    d = decide(cases, [1, 2])
    assert d["largest_component_foreground"] is False
    assert d["largest_component_classes"] == [1]
    assert d["dice_before"] == pytest.approx((0.7 + 0.9) / 2)
    assert d["dice_after"] == pytest.approx((0.8 + 0.9) / 2)
    # the foreground step is kept when it raises the mean
    gain = [{"base": {1: 0.5}, "fg": {1: 0.6}, "cls_base": {1: 0.55}, "cls_fg": {1: 0.6}}]
    d = decide(gain, [1])
    assert d["largest_component_foreground"] is True and d["largest_component_classes"] == []
    assert d["dice_after"] == pytest.approx(0.6)
