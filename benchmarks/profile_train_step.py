"""Where one training step's time goes: medseg3d's `unet` at the hippocampus plan, random data, no loader.

Patch 40x56x40, batch 7, features 32-256 (nnU-Net's Task04 plan), deep-supervised Dice+CE, SGD,
gradient clipping; 2 warm-up steps (compilation falls there), then the mean of `--steps` steps, and
with `--profile` a torch-profiler table of one more step. Modes: `contiguous` (eager), `channels-last`
(eager, our channels-last instance norm), `compile` (channels-last + torch.compile, the fp32 CPU
default of `medseg3d train` for long runs).

    python benchmarks/profile_train_step.py --mode compile --threads 2 --profile
"""

from __future__ import annotations

import argparse
import time

import torch

from medseg3d.losses import DeepSupervisionLoss, DiceCELoss
from medseg3d.networks import build_network


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["contiguous", "channels-last", "compile"], default="compile")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = build_network("unet", in_channels=1, num_classes=3, dims=3, strides=[[1, 1, 1]] + [[2, 2, 2]] * 3,
                        kernel_sizes=[[3, 3, 3]] * 4, features=[32, 64, 128, 256])
    x = torch.randn(7, 1, 40, 56, 40)
    y = torch.randint(0, 3, (7, 1, 40, 56, 40))
    if args.mode != "contiguous":
        net = net.to(memory_format=torch.channels_last_3d)
        x = x.contiguous(memory_format=torch.channels_last_3d)
    model = torch.compile(net) if args.mode == "compile" else net
    loss_fn = DeepSupervisionLoss(DiceCELoss())
    opt = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.99, nesterov=True)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
        opt.step()

    t0 = time.perf_counter()
    for _ in range(2):
        step()
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    print(f"{args.mode}: {(time.perf_counter() - t0) / args.steps:.2f} s/step (warm-up {warm:.0f} s, "
          f"{args.threads} threads, torch {torch.__version__})")
    if args.profile:
        from torch.profiler import profile

        with profile() as prof:
            step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
