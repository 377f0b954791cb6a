"""Seconds per patch of the hippocampus U-Net's forward pass at batch 1, 2, 4 and 8 (no grad, fp32, CPU).

    python benchmarks/bench_window_batch.py [--threads 2] [--widths 32,16,8,4]

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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for width in (int(w) for w in args.widths.split(",")):
        time_width(width)


def time_width(width: int) -> None:
    """Print seconds per patch at each batch size and memory format for the network of first-stage `width`."""
    features = [width, 2 * width, 4 * width, 8 * width]
    net = build_network("unet", in_channels=1, num_classes=3, deep_supervision=False, features=features,
                        dims=3, strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]], kernel_sizes=[[3, 3, 3]] * 4,
                        patch_size=[40, 56, 40], options={}).eval()
    for channels_last in (False, True):
        fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
        model = net.to(memory_format=fmt)
        for batch in (1, 2, 4, 8):
            x = torch.randn(batch, 1, 40, 56, 40).contiguous(memory_format=fmt)
            with torch.inference_mode():
                model(x)  # warm-up
                t0, passes = time.perf_counter(), max(1, 8 // batch)
                for _ in range(passes):
                    model(x)
                per_patch = (time.perf_counter() - t0) / (passes * batch)
            print(f"features {'-'.join(map(str, features))} channels_last={channels_last} batch {batch}: "
                  f"{per_patch:.3f} s/patch", flush=True)


if __name__ == "__main__":
    main()
