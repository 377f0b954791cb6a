"""medseg3d predict vs nnU-Net v2's predictor: seconds per case and peak RSS, alternating repetitions.

    python benchmarks/bench_predict.py --cases 8 --reps 5 --out /tmp/bench_predict.json
    python benchmarks/bench_predict.py --parts large --large-reps 2 --out /tmp/bench_large.json
    python benchmarks/bench_predict.py --parts "" --trained WORK_DIR   # bf16 vs fp32 Dice

Both tools run in the same Python (an environment with nnunetv2 and medseg3d: `pip install -e
".[bench]" torch==2.13.0`, so one torch version), each in a fresh child process with the same thread
count, one child at a time (never two at once); peak RSS is the child's `ru_maxrss`. Every repetition
runs each tool once, the order alternating between repetitions (`benchmarks/_fair.py`), and the report
gives each tool's own seconds per repetition and the medians; ratios are nnU-Net / medseg3d of the
medians (> 1: medseg3d better), with the per-repetition ratios beside them. Speed and memory ratios
are quoted like with like: medseg3d fp32 against nnU-Net (which predicts in fp32 on a CPU); medseg3d
bf16 (run only where the CPU has native bf16, or with `--precisions fp32,bf16`) is a different
precision and is listed as such, never as the headline ratio. Both networks are randomly
initialised with the same topology (medseg3d's 3d_fullres plan of the hippocampus: patch 40x56x40,
features 32-64-128-256, 3x3x3 kernels), same step and TTA: speed does not depend on the weights. The
load average before and after each child is recorded. Parts:
  hippocampus: the first N images of Task04_Hippocampus/imagesTs (or the shipped imagesTs), with and
         without mirror TTA.
  large: a synthetic 512x512x400 volume at 0.8x0.8x1.0 mm, 4 classes, plan spacing 1 mm, a small
         network with a 128^3 patch, step 1.0 and no TTA, medseg3d in fp32 like nnU-Net (it is about
         memory, not speed).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _child import run_child
from _fair import alternating, median

ROOT = Path(__file__).resolve().parents[1]
MINI = ROOT / "medseg3d" / "resources" / "hippocampus_mini"
TASK04 = Path("/work/shared/data/Task04_Hippocampus")


# ---------------------------------------------------------------------------- setup
def nnunet_plans_from(cfg: dict, name: str, reader: str = "NibabelIO") -> dict:
    """An nnU-Net v2 plans dict with the same spacing, patch and PlainConvUNet topology as a medseg3d config."""
    n = len(cfg["features"])
    resampling = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    return {
        "dataset_name": name, "plans_name": "nnUNetPlans", "image_reader_writer": reader,
        "original_median_spacing_after_transp": cfg["spacing"], "original_median_shape_after_transp": cfg["median_shape"],
        "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": {"mean": 0.0, "std": 1.0, "percentile_00_5": -3.0,
                                                              "percentile_99_5": 3.0, "max": 5.0, "min": -5.0,
                                                              "median": 0.0}},
        "configurations": {"3d_fullres": {
            "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
            "batch_size": cfg["batch_size"], "patch_size": cfg["patch_size"],
            "median_image_size_in_voxels": cfg["median_shape"], "spacing": cfg["spacing"],
            "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
            "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_data_kwargs": resampling,
            "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_seg_kwargs": {**resampling, "is_seg": True, "order": 1},
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities_kwargs": {**resampling, "order": 1},
            "batch_dice": False,
            "architecture": {
                "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                "arch_kwargs": {
                    "n_stages": n, "features_per_stage": cfg["features"], "conv_op": "torch.nn.modules.conv.Conv3d",
                    "kernel_sizes": cfg["kernel_sizes"], "strides": cfg["strides"], "n_conv_per_stage": [2] * n,
                    "n_conv_per_stage_decoder": [2] * (n - 1), "conv_bias": True,
                    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                    "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
                    "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
                "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
        }},
    }


def save_random_medseg_fold(wd: Path, seed: int = 0) -> int:
    import torch

    from medseg3d.inference import save_checkpoint
    from medseg3d.networks import build_network
    from medseg3d.plans.schema import Plans

    plans = Plans.load(wd)
    cfg = plans.configuration("3d_fullres")
    torch.manual_seed(seed)
    net = build_network(cfg.architecture, in_channels=plans.num_channels, num_classes=plans.num_classes,
                        **cfg.network_kwargs())
    save_checkpoint(wd / "results" / "3d_fullres" / cfg.architecture / "fold_0" / "checkpoint_final.pt", {
        "plan_hash": plans.network_hash("3d_fullres"), "configuration": "3d_fullres", "architecture": cfg.architecture,
        "network_kwargs": cfg.network_kwargs(), "in_channels": plans.num_channels,
        "num_classes": plans.num_classes, "model": net.state_dict()})
    return sum(p.numel() for p in net.parameters())


def setup_hippocampus(bench: Path, n_cases: int) -> tuple[Path, Path, Path, dict]:
    wd = bench / "wd"
    if not (wd / "plans.json").is_file():
        subprocess.run([sys.executable, "-m", "medseg3d", "plan", str(MINI), "-o", str(wd), "--configs",
                        "3d_fullres", "-j", "1"], check=True, stdout=subprocess.DEVNULL)
    params = save_random_medseg_fold(wd)
    src = TASK04 / "imagesTs" if (TASK04 / "imagesTs").is_dir() else MINI / "imagesTs"
    files = sorted(p for p in src.glob("*.nii.gz") if not p.name.startswith("."))[:n_cases]
    med_in, nn_in = bench / "in_medseg", bench / "in_nnunet"
    for d in (med_in, nn_in):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
    for f in files:
        os.symlink(f, med_in / f.name)
        os.symlink(f, nn_in / f.name.replace(".nii.gz", "_0000.nii.gz"))
    cfg = json.loads((wd / "plans.json").read_text())["configurations"]["3d_fullres"]
    nn_plans = nnunet_plans_from(cfg, "Dataset990_Bench")
    (bench / "nnunet_plans.json").write_text(json.dumps(nn_plans))
    (bench / "nnunet_dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MRI"}, "labels": {"background": 0, "Anterior": 1, "Posterior": 2},
        "numTraining": 0, "file_ending": ".nii.gz"}))
    return wd, med_in, nn_in, {"params": params, "patch": cfg["patch_size"], "features": cfg["features"],
                                "source": str(src), "cases": [f.name for f in files]}


def setup_large(bench: Path, shape=(512, 512, 400), spacing=(0.8, 0.8, 1.0)) -> tuple[Path, Path, Path]:
    import nibabel as nib
    import numpy as np

    from medseg3d.plans.schema import Plans

    big = bench / "large"
    (big / "in_medseg").mkdir(parents=True, exist_ok=True)
    (big / "in_nnunet").mkdir(parents=True, exist_ok=True)
    img_path = big / "in_medseg" / "ct_000.nii"
    if not img_path.is_file():
        rng = np.random.default_rng(0)
        arr = np.empty(shape, dtype=np.float32)
        for z in range(0, shape[2], 50):  # slab-wise to keep this script's memory low
            arr[:, :, z:z + 50] = rng.normal(0, 300, size=(shape[0], shape[1], min(50, shape[2] - z)))
        arr[:16] = 0  # some air to crop
        nib.save(nib.Nifti1Image(arr, np.diag([*spacing, 1.0])), img_path)
        del arr
    link = big / "in_nnunet" / "ct_000_0000.nii"
    if not link.exists():
        os.symlink(img_path, link)
    wd = big / "wd"
    raw = copy.deepcopy(Plans.load(bench / "wd").raw)
    raw["labels"] = {"0": "background", "1": "a", "2": "b", "3": "c"}
    c = raw["configurations"]["3d_fullres"]
    c.update({"spacing": [1.0, 1.0, 1.0], "patch_size": [128, 128, 128], "features": [8, 16, 32, 64, 64],
              "strides": [[1, 1, 1]] + [[2, 2, 2]] * 4, "kernel_sizes": [[3, 3, 3]] * 5,
              "median_shape": [410, 410, 400],
              "normalization": [{"scheme": "zscore", "mean": 0.0, "std": 1.0, "lower": -1e9, "upper": 1e9}]})
    raw["configurations"] = {"3d_fullres": c}
    wd.mkdir(exist_ok=True)
    Plans(raw).save(wd / "plans.json")
    save_random_medseg_fold(wd)
    (big / "nnunet_plans.json").write_text(json.dumps(nnunet_plans_from(c, "Dataset991_Large")))
    (big / "nnunet_dataset.json").write_text(json.dumps({
        "channel_names": {"0": "noise"}, "labels": {"background": 0, "a": 1, "b": 2, "c": 3},
        "numTraining": 0, "file_ending": ".nii"}))
    return wd, big / "in_medseg", big / "in_nnunet"


def label_agreement(a: Path, b: Path) -> float:
    """Fraction of voxels with the same label in the same-named NIfTI files of folders `a` and `b`."""
    import nibabel as nib
    import numpy as np

    same = total = 0
    for f in sorted(a.glob("*.nii.gz")):
        x, y = np.asarray(nib.load(f).dataobj), np.asarray(nib.load(b / f.name).dataobj)
        same += int((x == y).sum())
        total += x.size
    return same / max(total, 1)


def trained_precision_check(work_dir: Path, bench: Path, threads: int) -> dict:
    """Dice against labelsTs of the shipped held-out cases with a trained WORK_DIR, bf16 vs fp32 (TTA on)."""
    import nibabel as nib
    import numpy as np
    import torch

    from medseg3d.inference.folder import predict_folder
    from medseg3d.plans.schema import Plans

    torch.set_num_threads(threads)
    labels = sorted(k for k in Plans.load(work_dir).labels if k > 0)
    out: dict = {}
    for prec in ("bf16", "fp32"):
        dst = bench / f"trained_{prec}"
        t0 = time.perf_counter()
        predict_folder(work_dir, MINI / "imagesTs", dst, device="cpu", overwrite=True, precision=prec)
        dice = {c: [] for c in labels}
        for ref in sorted((MINI / "labelsTs").glob("*.nii.gz")):
            r, p = np.asarray(nib.load(ref).dataobj), np.asarray(nib.load(dst / ref.name).dataobj)
            for c in labels:
                den = int((r == c).sum() + (p == c).sum())
                dice[c].append(1.0 if den == 0 else 2 * int(((r == c) & (p == c)).sum()) / den)
        out[prec] = {"seconds": time.perf_counter() - t0, "mean_dice": {c: float(np.mean(v)) for c, v in dice.items()}}
    out["label_agreement"] = label_agreement(bench / "trained_bf16", bench / "trained_fp32")
    return out


# ---------------------------------------------------------------------------- repetitions
def compare(tools: list[tuple[str, str, dict]], reps: int, workdir: Path, prefix: str) -> dict:
    """Run every tool once per repetition, one at a time, the order alternating; medians and each run.

    `tools`: (name, child kind, spec). Returns per tool the runs and the medians of seconds per case,
    total seconds and peak RSS; "ratios" compares every medseg3d tool with nnU-Net (median and per rep).
    """
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in tools}
    for rep in range(reps):
        for pos, (name, kind, spec) in enumerate(alternating(tools, rep)):
            res = run_child(kind, spec, f"{prefix}_{name}", workdir)
            res.update({"rep": rep, "position_in_rep": pos, "s_per_case": res["total_s"] / max(res["cases"], 1)})
            runs[name].append(res)
            print(f"{prefix} rep {rep} {name}: {res['s_per_case']:.2f} s/case, peak RSS {res['peak_rss_mb']:.0f} MB, "
                  f"load {res['load_before']:.2f} -> {res['load_after']:.2f}", file=sys.stderr, flush=True)
    out: dict = {}
    for name, rs in runs.items():
        out[name] = {"precision": tools[[t[0] for t in tools].index(name)][2].get("precision", "fp32"),
                     "median_s_per_case": median([r["s_per_case"] for r in rs]),
                     "median_total_s": median([r["total_s"] for r in rs]),
                     "median_peak_rss_mb": median([r["peak_rss_mb"] for r in rs]), "runs": rs}
    nn = out["nnunet"]
    out["ratios"] = {}
    for name, rs in runs.items():
        if name == "nnunet":
            continue
        ms = out[name]
        out["ratios"][name] = {
            "like_for_like": ms["precision"] == "fp32",
            "speed_median": nn["median_s_per_case"] / ms["median_s_per_case"],
            "speed_per_rep": [a["s_per_case"] / b["s_per_case"] for a, b in zip(runs["nnunet"], rs)],
            "peak_rss_median": nn["median_peak_rss_mb"] / ms["median_peak_rss_mb"],
            "peak_rss_per_rep": [a["peak_rss_mb"] / b["peak_rss_mb"] for a, b in zip(runs["nnunet"], rs)]}
    return out


def table(title: str, res: dict) -> str:
    """Markdown rows: each tool's own median seconds and RSS, the ratio to nnU-Net and its range over reps."""
    head = ("| tool | precision | s/case median (each rep) | peak RSS MB median | nnU-Net / this: speed (reps min-max) "
            "| memory (reps min-max) |")
    lines = [f"\n{title}", head, "|---|---|---|---|---|---|"]
    for name, r in res.items():
        if name == "ratios":
            continue
        each = ", ".join(f"{x['s_per_case']:.2f}" for x in r["runs"])
        q = res["ratios"].get(name)
        ratio = "1" if q is None else (
            f"{q['speed_median']:.2f}x ({min(q['speed_per_rep']):.2f}-{max(q['speed_per_rep']):.2f})"
            + ("" if q["like_for_like"] else " [other precision]"))
        mem = "1" if q is None else (f"{q['peak_rss_median']:.2f}x ({min(q['peak_rss_per_rep']):.2f}-"
                                     f"{max(q['peak_rss_per_rep']):.2f})")
        lines.append(f"| {name} | {r['precision']} | {r['median_s_per_case']:.2f} ({each}) | "
                     f"{r['median_peak_rss_mb']:.0f} | {ratio} | {mem} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench-dir", default="/tmp/bench_predict")
    ap.add_argument("--cases", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5, help="repetitions of the hippocampus part (order alternating)")
    ap.add_argument("--large-reps", type=int, default=2, help="repetitions of the large part (about 7 min each)")
    ap.add_argument("--precisions", default=None,
                    help="medseg3d precisions to run (default: fp32, plus bf16 where the CPU has native bf16)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--step", type=float, default=0.5)
    ap.add_argument("--parts", default="hippocampus,large")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--trained", default=None,
                    help="a trained WORK_DIR of hippocampus_mini: Dice of bf16 vs fp32 on its held-out cases")
    args = ap.parse_args()

    bench = Path(args.bench_dir)
    bench.mkdir(parents=True, exist_ok=True)
    results: dict = {"threads": args.threads, "step": args.step, "python": sys.executable, "reps": args.reps,
                     "order": "one child at a time, tool order alternating per repetition"}
    import torch

    from medseg3d.inference.predictor import resolve_amp

    results["torch"] = torch.__version__
    # "auto" is what a user gets: bf16 only where oneDNN has native bf16 (AVX512-bf16/AMX), else fp32
    auto = resolve_amp("auto", torch.device("cpu"))
    results["auto_precision_on_this_cpu"] = str(auto)
    precisions = args.precisions.split(",") if args.precisions else ["fp32"] + (["bf16"] if auto is not None else [])
    if args.trained:
        results["trained_precision_check"] = trained_precision_check(Path(args.trained), bench, args.threads)
    parts = [p for p in args.parts.split(",") if p]
    tables = []
    if "hippocampus" in parts or "large" in parts:
        wd, med_in, nn_in, info = setup_hippocampus(bench, args.cases)
        results["hippocampus_setup"] = info
    if "hippocampus" in parts:
        rows = {}
        for tta in (True, False):
            base = {"threads": args.threads, "step": args.step, "tta": tta, "mirror_axes": [0, 1, 2]}
            t = "tta" if tta else "notta"
            tools = [("nnunet", "nnunet", {**base, "input": str(nn_in), "output": str(bench / f"o_nn_{t}"),
                                           "nnunet_plans": str(bench / "nnunet_plans.json"),
                                           "nnunet_dataset_json": str(bench / "nnunet_dataset.json")})]
            tools += [(f"medseg3d_{p}", "medseg", {**base, "precision": p, "work_dir": str(wd), "input": str(med_in),
                                                   "output": str(bench / f"o_ms_{p}_{t}")}) for p in precisions]
            rows[t] = compare(tools, args.reps, bench, t)
            if len(precisions) > 1 and "bf16" in precisions:
                rows[t]["bf16_vs_fp32_label_agreement"] = label_agreement(bench / f"o_ms_bf16_{t}",
                                                                          bench / f"o_ms_fp32_{t}")
            tables.append(table(f"hippocampus, {len(info['cases'])} cases, {'mirror TTA' if tta else 'no TTA'}, "
                                f"{args.reps} reps", {k: v for k, v in rows[t].items() if k != "bf16_vs_fp32_label_agreement"}))
            print(tables[-1], flush=True)
        results["hippocampus"] = rows
    if "large" in parts:
        lwd, l_med, l_nn = setup_large(bench)
        base = {"threads": args.threads, "step": 1.0, "tta": False, "mirror_axes": [0, 1, 2]}
        big = bench / "large"
        tools = [("medseg3d_fp32", "medseg", {**base, "precision": "fp32", "work_dir": str(lwd), "input": str(l_med),
                                              "output": str(big / "o_ms")}),
                 ("nnunet", "nnunet", {**base, "input": str(l_nn), "output": str(big / "o_nn"),
                                       "nnunet_plans": str(big / "nnunet_plans.json"),
                                       "nnunet_dataset_json": str(big / "nnunet_dataset.json")})]
        results["large"] = compare(tools, args.large_reps, big, "large")
        tables.append(table(f"large volume, {args.large_reps} reps", results["large"]))
        print(tables[-1], flush=True)
    text = json.dumps(results, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text)
    print("\n".join(tables))


if __name__ == "__main__":
    main()
