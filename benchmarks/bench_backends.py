"""medseg3d predict with each network backend vs nnU-Net v2's predictor, in one run: seconds per case.

    python benchmarks/bench_backends.py --reps 3 --out /tmp/bench_backends.json
    python benchmarks/bench_backends.py --trained WORK_DIR --reps 3 --out /tmp/bench_backends.json
    python benchmarks/bench_backends.py --smoke            # 2 cases, 1 rep: does every child run?

Cases: the held-out hippocampus cases, the last `--cases` (20) images of Task04_Hippocampus/imagesTr
by name, or with `--trained WORK_DIR` the fold-0 validation cases of its `splits.json` (first
`--cases`). Tools, each in a fresh child process with `--threads` (2) torch threads (onnxruntime
`intra_op_num_threads` and OpenVINO `INFERENCE_NUM_THREADS` follow torch's), one child at a time,
the order alternating between repetitions (`benchmarks/_fair.py`), with and without mirror TTA:

  torch, onnxruntime, openvino   `predict_folder(..., backend=B, precision="fp32")` (those installed)
  torch_auto                     with `--with-auto`: torch at `--precision auto` where that is not fp32
  nnunet                         nnU-Net v2's `nnUNetPredictor.predict_from_files_sequential`, case by case

Weights: medseg3d's 3d_fullres unet of the shipped hippocampus_mini plan (patch 40x56x40, 32-256
features) randomly initialised, and nnU-Net's PlainConvUNet of the same topology (as
`bench_predict.py`: speed does not depend on the weights); with `--trained`, medseg3d's tools run
that WORK_DIR's fold 0 (`checkpoint_final.pt`) and nnU-Net a random network of that checkpoint's
topology (features, strides, kernels, patch; its predictor cannot load medseg3d's weights). s/case: the tool's prediction loop (reading,
preprocessing, windows, export, writing; medseg3d's includes loading the checkpoint and creating the
backend's session from the cached ONNX export, which is made once before the timed runs,
`first_export_s`) divided by the cases; `process_wall_s` adds interpreter start and imports. Ratios: nnU-Net / tool of the medians (> 1: faster than nnU-Net) and torch / backend.

Agreement with torch fp32 on the same weights: the voxels whose label differs in the timed runs'
outputs (every case, with and without TTA), the largest probability difference on the first
`--prob-cases` (4) cases (an untimed TTA run with `--save-probabilities`), and with `--trained` the
mean Dice per class against labelsTr.
"""

from __future__ import annotations

import argparse
import importlib.metadata
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
from bench_predict import MINI, nnunet_plans_from, save_random_medseg_fold

TASK04 = Path("/work/shared/data/Task04_Hippocampus")
BACKENDS = ("torch", "onnxruntime", "openvino")


# ---------------------------------------------------------------------------- setup
def held_out_cases(n: int, trained: Path | None) -> list[Path]:
    """Image files of the held-out cases (see the module docstring)."""
    images = TASK04 / "imagesTr"
    if trained is not None and (trained / "splits.json").is_file():
        val = json.loads((trained / "splits.json").read_text())[0]["val"]
        return [images / f"{c}.nii.gz" for c in sorted(val)[:n]]
    return sorted(p for p in images.glob("*.nii.gz") if not p.name.startswith("."))[-n:]


def setup(bench: Path, n_cases: int, trained: Path | None) -> dict:
    """WORK_DIR (random fold 0, or `trained`), both tools' input folders and nnU-Net's plans."""
    wd = bench / "wd"
    if not (wd / "plans.json").is_file():
        subprocess.run([sys.executable, "-m", "medseg3d", "plan", str(MINI), "-o", str(wd), "--configs",
                        "3d_fullres", "-j", "1"], check=True, stdout=subprocess.DEVNULL)
    params = save_random_medseg_fold(wd)
    files = held_out_cases(n_cases, trained)
    med_in, nn_in = bench / "in_medseg", bench / "in_nnunet"
    for d in (med_in, nn_in):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
    for f in files:
        os.symlink(f, med_in / f.name)
        os.symlink(f, nn_in / f.name.replace(".nii.gz", "_0000.nii.gz"))
    cfg = json.loads((wd / "plans.json").read_text())["configurations"]["3d_fullres"]
    if trained is not None:  # nnU-Net's random network gets the trained one's topology, patch and spacing
        import torch

        cfg = json.loads((trained / "plans.json").read_text())["configurations"]["3d_fullres"]
        ckpt = torch.load(trained / "results" / "3d_fullres" / "unet" / "fold_0" / "checkpoint_final.pt",
                          map_location="cpu", weights_only=True)
        kw = ckpt["network_kwargs"]
        cfg = {**cfg, "features": kw["features"], "strides": kw["strides"], "kernel_sizes": kw["kernel_sizes"],
               "patch_size": kw["patch_size"]}
    (bench / "nnunet_plans.json").write_text(json.dumps(nnunet_plans_from(cfg, "Dataset992_Backends")))
    (bench / "nnunet_dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MRI"}, "labels": {"background": 0, "Anterior": 1, "Posterior": 2},
        "numTraining": 0, "file_ending": ".nii.gz"}))
    return {"work_dir": str(trained or wd), "med_in": str(med_in), "nn_in": str(nn_in), "cases": [f.name for f in files],
            "random_params": params, "patch": cfg["patch_size"], "features": cfg["features"],
            "weights": f"trained ({trained}); nnU-Net random with its topology" if trained
            else "random (seed 0), same topology for nnU-Net"}


def warm_exports(work_dir: str, backends: list[str]) -> dict[str, float]:
    """Seconds of the first ONNX export of fold 0 (kept in the user's cache, `backends.cached_export`), made
    before the timed runs so that every repetition measures what a second `predict` with this
    checkpoint costs; 0.0 when it was cached already."""
    from medseg3d.inference.backends import cached_export
    from medseg3d.inference.checkpoint import build_model_from_checkpoint, load_checkpoint
    from medseg3d.plans.schema import Plans

    if not any(b != "torch" for b in backends):
        return {}
    plans = Plans.load(work_dir)
    cfg = plans.configuration("3d_fullres")
    ckpt = load_checkpoint(Path(work_dir) / "results" / "3d_fullres" / cfg.architecture / "fold_0" /
                           "checkpoint_final.pt")
    t0 = time.perf_counter()
    cached_export(build_model_from_checkpoint(ckpt), plans.num_channels, cfg.patch_size)
    return {"fold_0": time.perf_counter() - t0}


def installed() -> list[str]:
    from medseg3d.inference.backends import installed_backends

    return [b for b in BACKENDS if b in installed_backends()]


# ---------------------------------------------------------------------------- runs
def timed(tools: list[tuple[str, str, dict]], reps: int, bench: Path, prefix: str) -> dict:
    """Every tool once per repetition, one at a time, the order alternating; medians and each run."""
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in tools}
    for rep in range(reps):
        for pos, (name, kind, spec) in enumerate(alternating(tools, rep)):
            res = run_child(kind, spec, f"{prefix}_{name}", bench)
            res.update({"rep": rep, "position_in_rep": pos, "s_per_case": res["total_s"] / max(res["cases"], 1)})
            runs[name].append(res)
            print(f"{prefix} rep {rep} {name}: {res['s_per_case']:.2f} s/case ({res['process_wall_s']:.1f} s "
                  f"process), load {res['load_before']:.2f} -> {res['load_after']:.2f}", file=sys.stderr, flush=True)
    out: dict = {name: {"median_s_per_case": median([r["s_per_case"] for r in rs]),
                        "median_process_wall_s": median([r["process_wall_s"] for r in rs]),
                        "median_peak_rss_mb": median([r["peak_rss_mb"] for r in rs]), "runs": rs}
                 for name, rs in runs.items()}
    ref = out.get("nnunet")
    for name, r in out.items():
        if ref is not None and name != "nnunet":
            r["nnunet_over_this"] = ref["median_s_per_case"] / r["median_s_per_case"]
            r["nnunet_over_this_per_rep"] = [a["s_per_case"] / b["s_per_case"]
                                             for a, b in zip(runs["nnunet"], runs[name])]
        if "torch" in out and name not in ("torch", "nnunet"):
            r["torch_over_this"] = out["torch"]["median_s_per_case"] / r["median_s_per_case"]
    return out


def agreement(backends: list[str], info: dict, bench: Path, threads: int, labels_dir: Path | None,
              prob_cases: int) -> dict:
    """Each backend against torch fp32: labels of the timed runs (every case, with and without TTA), the
    largest probability difference on the first `prob_cases` cases (an untimed TTA run with
    `--save-probabilities`), and with `labels_dir` the mean Dice per class of the TTA labels."""
    import nibabel as nib
    import numpy as np

    sub = bench / "in_prob"
    shutil.rmtree(sub, ignore_errors=True)
    sub.mkdir()
    for name in info["cases"][:prob_cases]:
        os.symlink(os.readlink(Path(info["med_in"]) / name), sub / name)
    probs = {}
    for b in backends:
        spec = {"threads": threads, "step": 0.5, "tta": True, "precision": "fp32", "backend": b,
                "work_dir": info["work_dir"], "input": str(sub), "output": str(bench / f"prob_{b}"),
                "save_probabilities": True}
        run_child("medseg", spec, f"prob_{b}", bench)
        probs[b] = bench / f"prob_{b}"
    def read(f: Path) -> np.ndarray:
        return np.asarray(nib.load(f).dataobj)

    report: dict = {}
    for b in backends:
        r: dict = {}
        for t in ("tta", "notta"):
            files = sorted((bench / f"o_{b}_{t}").glob("*.nii.gz"))
            r[f"voxels_with_other_label_{t}"] = sum(int((read(f) != read(bench / f"o_torch_{t}" / f.name)).sum())
                                                    for f in files)
            r[f"voxels_{t}"] = sum(read(f).size for f in files)
        r["max_probability_difference"] = max(
            float(np.abs(np.load(f)["probabilities"] - np.load(probs["torch"] / f.name)["probabilities"]).max())
            for f in sorted(probs[b].glob("*.npz")))
        r["probability_cases"] = prob_cases
        r["agrees"] = (r["max_probability_difference"] <= 1e-3 and r["voxels_with_other_label_tta"] == 0
                       and r["voxels_with_other_label_notta"] == 0)
        if labels_dir is not None:
            dice: dict[int, list[float]] = {1: [], 2: []}
            for f in sorted((bench / f"o_{b}_tta").glob("*.nii.gz")):
                seg, gt = read(f), read(labels_dir / f.name)
                for c, scores in dice.items():
                    den = int((gt == c).sum() + (seg == c).sum())
                    scores.append(1.0 if den == 0 else 2 * int(((gt == c) & (seg == c)).sum()) / den)
            r["mean_dice_tta"] = {str(c): float(np.mean(v)) for c, v in dice.items()}
        report[b] = r
    return report


def table(rows: dict, n_cases: int, reps: int) -> str:
    """Markdown: per tool s/case with and without TTA (each rep), the ratios."""
    lines = [f"\n{n_cases} held-out cases, {reps} reps (median s/case; each rep in brackets)",
             "| tool | TTA s/case | nnU-Net / tool | torch / tool | no TTA s/case | nnU-Net / tool | torch / tool |",
             "|---|---|---|---|---|---|---|"]
    for name in rows["tta"]:
        cells = [name]
        for t in ("tta", "notta"):
            r = rows[t][name]
            each = ", ".join(f"{x['s_per_case']:.2f}" for x in r["runs"])
            vs_nn = "1" if name == "nnunet" else (f"{r['nnunet_over_this']:.2f}x" if "nnunet_over_this" in r else "-")
            vs_torch = "1" if name == "torch" else (f"{r['torch_over_this']:.2f}x" if "torch_over_this" in r else "-")
            cells += [f"{r['median_s_per_case']:.2f} ({each})", vs_nn, vs_torch]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench-dir", default="/tmp/bench_backends")
    ap.add_argument("--cases", type=int, default=20)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backends", default=None, help="comma-separated (default: every installed one)")
    ap.add_argument("--no-nnunet", action="store_true", help="leave nnU-Net out (an environment without nnunetv2)")
    ap.add_argument("--trained", default=None, help="a trained WORK_DIR of Task04 (fold 0): its weights and Dice")
    ap.add_argument("--with-auto", action="store_true",
                    help="also time torch at --precision auto where that is not fp32 (bf16 CPUs)")
    ap.add_argument("--prob-cases", type=int, default=4, help="cases whose probabilities are compared")
    ap.add_argument("--smoke", action="store_true", help="2 cases, 1 rep, to check the script")
    ap.add_argument("--out", default=None, help="write the report as JSON here")
    args = ap.parse_args()
    if args.smoke:
        args.cases, args.reps = 2, 1
    import torch

    from medseg3d.inference.backends import CPU_AUTO_ORDER
    from medseg3d.inference.predictor import resolve_amp

    bench = Path(args.bench_dir)
    bench.mkdir(parents=True, exist_ok=True)
    trained = Path(args.trained) if args.trained else None
    info = setup(bench, args.cases, trained)
    backends = args.backends.split(",") if args.backends else installed()
    auto = resolve_amp("auto", torch.device("cpu"))
    report: dict = {"threads": args.threads, "reps": args.reps, "python": sys.executable, "torch": torch.__version__,
                    "auto_precision_on_this_cpu": str(auto), "cpu_auto_order": list(CPU_AUTO_ORDER),
                    "order": "one child at a time, tool order alternating per repetition", "setup": info}
    for mod in ("onnxruntime", "openvino", "nnunetv2"):  # the installed distribution (nnunetv2 has no __version__)
        try:
            report[f"{mod}_version"] = importlib.metadata.version(mod)
        except importlib.metadata.PackageNotFoundError:
            report[f"{mod}_version"] = None
    report["first_export_s"] = warm_exports(info["work_dir"], backends)
    rows = {}
    for tta in (True, False):
        t = "tta" if tta else "notta"
        base = {"threads": args.threads, "step": 0.5, "tta": tta, "mirror_axes": [0, 1, 2]}
        tools = [(b, "medseg", {**base, "precision": "fp32", "backend": b, "work_dir": info["work_dir"],
                                "input": info["med_in"], "output": str(bench / f"o_{b}_{t}")}) for b in backends]
        if auto is not None and args.with_auto:
            tools.append(("torch_auto", "medseg", {**base, "precision": "auto", "backend": "torch",
                                                   "work_dir": info["work_dir"], "input": info["med_in"],
                                                   "output": str(bench / f"o_torch_auto_{t}")}))
        if not args.no_nnunet:
            tools.append(("nnunet", "nnunet", {**base, "input": info["nn_in"], "output": str(bench / f"o_nn_{t}"),
                                               "nnunet_plans": str(bench / "nnunet_plans.json"),
                                               "nnunet_dataset_json": str(bench / "nnunet_dataset.json")}))
        for _, _, spec in tools:  # no outputs of an earlier run (other cases) in the scored folders
            shutil.rmtree(spec["output"], ignore_errors=True)
        rows[t] = timed(tools, args.reps, bench, t)
    report["timed"] = rows
    if "torch" in backends:
        report["agreement_with_torch_fp32"] = agreement(backends, info, bench, args.threads,
                                                        TASK04 / "labelsTr" if trained else None, args.prob_cases)
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(table(rows, len(info["cases"]), args.reps))
    print(json.dumps(report.get("agreement_with_torch_fp32"), indent=1))


if __name__ == "__main__":
    main()
