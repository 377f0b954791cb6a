"""Forward+backward of medseg3d's `unet` vs nnU-Net's PlainConvUNet (and MONAI's DynUNet) on the CPU.

Run in the bench venv (nnunetv2, dynamic_network_architectures and monai installed, medseg3d
installed with `pip install -e . --no-deps`):

    /work/venv-bench/bin/python benchmarks/bench_networks.py --threads 2 --json /tmp/bench_networks.json

At nnU-Net v2's 3d_fullres plan for Task04_Hippocampus (read from `--nnunet-plans nnUNetPlans.json`
when given, else the values nnU-Net printed for the 208 cases: patch 40x56x40, batch 7, 4 stages,
3x3x3 kernels, features 32-256, 3 classes) it builds the three networks with the same seed, checks
parameter counts, then times one training step (forward, deep-supervised Dice+CE loss, backward)
per network and precision mode, the networks interleaved within every repetition so that load
from other processes hits them alike. Peak memory: each (network, mode) runs alone in a fresh
child process; the figure is the rise of the process's peak RSS (VmHWM) over its RSS after
building the network and the batch (with `--device cuda`: the rise of
torch.cuda.max_memory_allocated over the allocation before the first step). Prints a markdown table: wall-clock median and min, process
CPU time (all threads; less sensitive to other processes taking the cores), and nnU-Net's time
divided by each network's (> 1: faster than nnU-Net).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _fair import alternating

PLAN = {"patch": [40, 56, 40], "batch": 7, "in_channels": 1, "num_classes": 3,
            "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]], "kernel_sizes": [[3, 3, 3]] * 4,
            "features": [32, 64, 128, 256]}
MODES = ("fp32", "bf16", "bf16_cl")
NETS = ("ours", "nnunet", "dynunet")


def load_nnunet_plan(path: Path) -> dict:
    """3d_fullres of an nnUNetPlans.json as PLAN's keys (nnU-Net's axis order; the network does not care)."""
    plans = json.loads(path.read_text())
    cfg = plans["configurations"]["3d_fullres"]
    arch = cfg["architecture"]["arch_kwargs"]
    return dict(PLAN, patch=cfg["patch_size"], batch=cfg["batch_size"], strides=arch["strides"],
                kernel_sizes=arch["kernel_sizes"], features=arch["features_per_stage"])


def build(name: str, plan: dict) -> nn.Module:
    torch.manual_seed(0)
    common = {"strides": plan["strides"], "kernel_sizes": plan["kernel_sizes"]}
    if name == "ours":
        from medseg3d.networks import build_network

        return build_network("unet", in_channels=plan["in_channels"], num_classes=plan["num_classes"], dims=3,
                             features=plan["features"], **common)
    if name == "nnunet":
        from dynamic_network_architectures.architectures.unet import PlainConvUNet

        n = len(plan["features"])
        return PlainConvUNet(plan["in_channels"], n, plan["features"], nn.Conv3d, plan["kernel_sizes"],
                             plan["strides"], 2, plan["num_classes"], 2, True, nn.InstanceNorm3d,
                             {"eps": 1e-5, "affine": True}, None, None, nn.LeakyReLU, {"inplace": True},
                             deep_supervision=True)
    if name == "dynunet":
        from monai.networks.nets import DynUNet

        n = len(plan["features"])
        return DynUNet(3, plan["in_channels"], plan["num_classes"], plan["kernel_sizes"], plan["strides"],
                       plan["strides"][1:], filters=plan["features"], norm_name=("instance", {"affine": True}),
                       act_name=("leakyrelu", {"negative_slope": 0.01, "inplace": True}),
                       deep_supervision=True, deep_supr_num=n - 2, res_block=False)
    raise ValueError(name)


def make_step(name: str, plan: dict, mode: str, device: str = "cpu", compile_net: bool = False):
    """(net, step()) where step runs forward + deep-supervised Dice+CE + backward once.

    mode: fp32 | bf16 | fp16 (autocast on `device`), a `_cl` suffix adds channels_last_3d.
    """
    from medseg3d.losses import DeepSupervisionLoss, DiceCELoss, deep_supervision_weights

    net = build(name, plan).train()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(plan["batch"], plan["in_channels"], *plan["patch"], generator=g)
    y = torch.randint(0, plan["num_classes"], (plan["batch"], *plan["patch"]), generator=g)
    if mode.endswith("_cl"):
        net = net.to(memory_format=torch.channels_last_3d)
        x = x.to(memory_format=torch.channels_last_3d)
    net, x, y = net.to(device), x.to(device), y.to(device)
    model = torch.compile(net) if compile_net else net
    loss_fn = DeepSupervisionLoss(DiceCELoss())
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mode.split("_")[0])

    def step() -> None:
        net.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = model(x)
            if name == "dynunet":  # (B, n_out, K, *patch): every head upsampled to the full patch
                w = deep_supervision_weights(out.shape[1])
                loss = sum(wi * loss_fn.loss(out[:, i], y) for i, wi in enumerate(w) if wi)
            else:
                loss = loss_fn(out, y)
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()

    return net, step


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def child_memory(name: str, mode: str, plan: dict, threads: int) -> None:
    """Child process: print JSON {peak_rise_mib} of two training steps."""
    torch.set_num_threads(threads)
    _, step = make_step(name, plan, mode)
    base = _rss_kib("VmRSS")
    for _ in range(2):
        step()
    print(json.dumps({"peak_rise_mib": (_rss_kib("VmHWM") - base) / 1024}))


def measure_memory(name: str, mode: str, plan_json: str, threads: int) -> float:
    out = subprocess.run([sys.executable, __file__, "--child", name, mode, "--plan-json", plan_json,
                          "--threads", str(threads)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rise_mib"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3, help="timed steps per network and mode (after 1 warm-up)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--nets", default=",".join(NETS))
    ap.add_argument("--nnunet-plans", type=Path, default=None, help="nnUNetPlans.json of the hippocampus")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--compile", action="store_true", help="torch.compile every network (warm-up compiles)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cuda: use --modes fp32,fp16,fp16_cl; peak memory = torch.cuda.max_memory_allocated")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--plan-json", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    plan = json.loads(args.plan_json) if args.plan_json else (
        load_nnunet_plan(args.nnunet_plans) if args.nnunet_plans else PLAN)
    if args.child:
        child_memory(args.child[0], args.child[1], plan, args.threads)
        return
    torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True  # as nnU-Net's trainer
    nets, modes = args.nets.split(","), args.modes.split(",")
    params = {n: sum(p.numel() for p in build(n, plan).parameters()) for n in nets}
    print(f"plan: {plan}\ntorch {torch.__version__}, threads {args.threads}\nparameters: {params}", flush=True)
    times: dict[tuple[str, str], list[float]] = {}  # wall-clock s per step
    cpu: dict[tuple[str, str], list[float]] = {}  # process CPU s per step (all threads)
    mem: dict[tuple[str, str], float] = {}
    for mode in modes:
        steps = {}
        for n in nets:
            steps[n] = make_step(n, plan, mode, args.device, args.compile)[1]
            if args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                steps[n]()  # warm-up (and cuDNN autotuning)
                mem[(n, mode)] = (torch.cuda.max_memory_allocated() - base) / 2**20
                continue
            steps[n]()  # warm-up
        for r in range(args.reps):
            for n in alternating(nets, r):
                t0, c0 = time.perf_counter(), time.process_time()
                steps[n]()
                times.setdefault((n, mode), []).append(time.perf_counter() - t0)
                cpu.setdefault((n, mode), []).append(time.process_time() - c0)
        print(mode, {n: [round(t, 2) for t in times[(n, mode)]] for n in nets}, flush=True)
        del steps
    if not args.no_memory and args.device == "cpu":
        for mode in modes:
            for n in nets:
                mem[(n, mode)] = measure_memory(n, mode, json.dumps(plan), args.threads)
            print(mode, "peak rise MiB", {n: round(mem[(n, mode)]) for n in nets}, flush=True)
    rows = []
    for mode in modes:
        for n in nets:
            key, ref = (n, mode), ("nnunet", mode)
            row = {"net": n, "mode": mode, "params": params[n], "times": times[key], "cpu_times": cpu[key],
                       "median_s": statistics.median(times[key]), "min_s": min(times[key]),
                       "median_cpu_s": statistics.median(cpu[key]), "peak_rise_mib": mem.get(key)}
            if "nnunet" in nets:  # ratio > 1: ours faster
                row["speedup_median"] = statistics.median(times[ref]) / row["median_s"]
                row["speedup_min"] = min(times[ref]) / row["min_s"]
                row["speedup_cpu"] = statistics.median(cpu[ref]) / row["median_cpu_s"]
            rows.append(row)
    print("\n| network | mode | parameters | wall s median (min) | CPU s median | nnU-Net / this: median, min, CPU "
          "| peak RSS rise MiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        m = f"{r['peak_rise_mib']:.0f}" if r["peak_rise_mib"] is not None else "n/a"
        ratio = (f"{r['speedup_median']:.2f}x, {r['speedup_min']:.2f}x, {r['speedup_cpu']:.2f}x"
                 if "speedup_median" in r else "n/a")
        print(f"| {r['net']} | {r['mode']} | {r['params']:,} | {r['median_s']:.2f} ({r['min_s']:.2f}) | "
              f"{r['median_cpu_s']:.2f} | {ratio} | {m} |")
    if args.json:
        args.json.write_text(json.dumps({"plan": plan, "threads": args.threads, "torch": torch.__version__, "rows": rows},
                                        indent=1))


if __name__ == "__main__":
    main()
