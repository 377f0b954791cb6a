"""Seconds per patch of the hippocampus U-Net's forward pass at batch 1, 2, 4 and 8 (no grad, fp32, CPU).

    python benchmarks/bench_window_batch.py [--threads 2] [--widths 32,16,8,4] [--dims 2]

`--dims 2`: the hippocampus 2d plan's network instead (patch 40x56, 4 stages, strides 2), at batch 1, 4,
8, 16 and 32 slices (32: the 2D default's cap), 32 slices per setting.

The network of `bench_predict.py` (medseg3d `unet`, 4 stages from `--widths` first-stage features
doubling to 8x, patch 40x56x40, random weights), contiguous and channels-last, one warm-up pass then
8 patches per setting. This is what `predictor.default_batch_size` rests on for 3D float32 on a CPU
without AVX-512 (docs/benchmarks.md, "Prediction"): on the 2-core AVX2 CPU, batch 1 was the fastest
per patch for nnU-Net's 32-256 width, batch 8 for the narrower ones.
"""

from __future__ import annotations

import argparse
import time

import torch

from medseg3d.networks import build_network


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--widths", default="32,16,8,4", help="first-stage features of the networks timed")
    ap.add_argument("--dims", type=int, default=3, choices=(2, 3), help="3: the 3d_fullres network, 2: the 2d one")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for width in (int(w) for w in args.widths.split(",")):
        time_width(width, args.dims)


def time_width(width: int, dims: int = 3) -> None:
    """Print seconds per patch at each batch size and memory format for the network of first-stage `width`."""
    features = [width, 2 * width, 4 * width, 8 * width]
    patch = [40, 56, 40][:dims]
    net = build_network("unet", in_channels=1, num_classes=3, deep_supervision=False, features=features,
                        dims=dims, strides=[[1] * dims] + [[2] * dims] * 3, kernel_sizes=[[3] * dims] * 4,
                        patch_size=patch, options={}).eval()
    batches, per_setting = ((1, 2, 4, 8), 8) if dims == 3 else ((1, 4, 8, 16, 32), 32)
    for channels_last in (False, True):
        fmt = (torch.channels_last_3d if dims == 3 else torch.channels_last) if channels_last else torch.contiguous_format
        model = net.to(memory_format=fmt)
        for batch in batches:
            x = torch.randn(batch, 1, *patch).contiguous(memory_format=fmt)
            with torch.inference_mode():
                model(x)  # warm-up
                t0, passes = time.perf_counter(), max(1, per_setting // batch)
                for _ in range(passes):
                    model(x)
                per_patch = (time.perf_counter() - t0) / (passes * batch)
            print(f"features {'-'.join(map(str, features))} channels_last={channels_last} batch {batch}: "
                  f"{per_patch:.3f} s/patch", flush=True)


if __name__ == "__main__":
    main()
