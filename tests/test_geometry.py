"""The one bounding box and the anisotropy rules of `medseg3d.geometry`."""

from __future__ import annotations

import numpy as np

from medseg3d.geometry import anisotropic_axis, bounding_box, dummy_2d_axis, separate_axis_for
from medseg3d.preprocess.crop import bbox_of_mask


def test_bounding_box_and_its_list_form():
    mask = np.zeros((6, 7, 8), bool)
    assert bounding_box(mask) is None
    assert bbox_of_mask(mask) == [[0, 6], [0, 7], [0, 8]]  # crop keeps everything when nothing is set
    mask[1, 2, 3] = mask[4, 2, 6] = True
    assert bounding_box(mask) == (slice(1, 5), slice(2, 3), slice(3, 7))
    assert bbox_of_mask(mask) == [[1, 5], [2, 3], [3, 7]]


def test_anisotropy_rules():
    assert anisotropic_axis((0.7, 0.7, 5.0)) == 2 and anisotropic_axis((1.0, 1.0, 3.0)) is None
    assert separate_axis_for((1.0, 1.0, 1.0), (4.0, 1.0, 1.0)) == 0
    assert dummy_2d_axis((160, 192, 12)) == 2 and dummy_2d_axis((40, 56, 40)) is None and dummy_2d_axis((64, 64)) is None
