"""Make a through-plane anisotropic copy of an MSD dataset: the last array axis resampled to 3 mm.

    python benchmarks/make_anisotropic.py /work/shared/data/Task04_Hippocampus /tmp/Task04_aniso3mm [--spacing 3]

Images: the slices along the last axis are averaged over the thicker slab (linear zoom with
anti-aliasing, as a thick-slice acquisition would record); labels: nearest neighbour. The affine is
scaled along that axis and its origin moved so the first slab's centre sits where it should.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
from scipy import ndimage

from medseg3d.io import Volume, load_dataset, read_label, read_volume, write_volume


def thicken(vol: Volume, spacing: float, axis: int, is_label: bool) -> Volume:
    """Resample `vol` `(C, X, Y, Z)` so `axis` (spatial) has `spacing` mm."""
    old = vol.spacing[axis]
    factor = old / spacing
    n_new = max(1, int(round(vol.spatial_shape[axis] * factor)))
    arr = vol.array
    out = []
    for c in range(arr.shape[0]):
        a = arr[c]
        zoom = [1.0] * 3
        zoom[axis] = n_new / a.shape[axis]
        if is_label:
            out.append(ndimage.zoom(a, zoom, order=0, mode="nearest", grid_mode=True))
        else:
            sigma = [0.0] * 3
            sigma[axis] = (spacing / old) / 2.355  # FWHM of the slab
            out.append(ndimage.zoom(ndimage.gaussian_filter(a.astype(np.float32), sigma), zoom, order=1,
                                    mode="nearest", grid_mode=True))
    affine = vol.affine.copy()
    col = affine[:3, axis] / old
    affine[:3, 3] += col * (spacing - old) / 2  # voxel centre of the first (thicker) slab
    affine[:3, axis] = col * spacing
    return Volume(np.stack(out).astype(arr.dtype), affine, None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("--spacing", type=float, default=3.0, help="through-plane spacing in mm (default 3)")
    ap.add_argument("--axis", type=int, default=2, help="array axis made coarse (default 2, the last)")
    args = ap.parse_args()
    spec = load_dataset(args.src)
    if args.dst.exists():
        shutil.rmtree(args.dst)
    for case in spec.cases:
        img = thicken(read_volume(case.images), args.spacing, args.axis, is_label=False)
        write_volume(img, args.dst / "imagesTr" / case.images[0].name)
        lab = thicken(read_label(case.label), args.spacing, args.axis, is_label=True)
        write_volume(lab, args.dst / "labelsTr" / case.label.name, dtype=np.uint8)
    meta = json.loads((args.src / "dataset.json").read_text())
    meta["name"] = meta.get("name", "dataset") + f"_aniso{args.spacing:g}mm"
    meta["description"] = f"{meta.get('description', '')} (axis {args.axis} resampled to {args.spacing:g} mm)"
    meta["test"] = []
    meta["numTest"] = 0
    (args.dst / "dataset.json").write_text(json.dumps(meta, indent=2))
    print(f"wrote {len(spec.cases)} cases to {args.dst}")


if __name__ == "__main__":
    main()
