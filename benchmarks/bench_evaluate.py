"""Evaluation speed: medseg3d vs nnU-Net v2's evaluator on the same folder, side by side, one run.

The 208 MSD Task04 Hippocampus labels are the references; perturbed copies (shifted by up to a
voxel, class 1 partly dilated, 0.2% random voxels flipped to 1 or 2; seeded) are the predictions,
written to a temporary folder. Each tool evaluates labels 1 and 2 with the same number of worker
processes, in a fresh interpreter of its own environment:

* API: `medseg3d.evaluation.evaluate_folders` (Dice, IoU, HD95, precision/recall, volumes, PA, MPA,
  mIoU, FWIoU) vs `nnunetv2.evaluation.evaluate_predictions.compute_metrics_on_folder_simple`
  (Dice, IoU, TP/FP/FN/TN), timed inside the process, imports excluded;
* CLI: `medseg3d evaluate` vs `nnUNetv2_evaluate_simple`, wall time of the whole command;
* serial: one process, a loop over the cases calling each tool's per-case function
  (`evaluate_case` vs nnU-Net's `compute_metrics` with `SimpleITKIO`): the per-case work alone,
  without either tool's pool start-up (nnU-Net's spawn pool re-imports torch in every worker).

Both tools' mean Dice are printed to show they measured the same thing. Rounds alternate the order
of the tools; the median per tool is reported.

    python benchmarks/bench_evaluate.py [--data /work/shared/data/Task04_Hippocampus/labelsTr]
        [--bench-python /work/venv-bench/bin/python] [--workers 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _fair import alternating

MEDSEG_API = """
import json, sys, time
from medseg3d.evaluation import evaluate_folders
t = time.perf_counter()
s = evaluate_folders(sys.argv[1], sys.argv[2], labels=[1, 2], workers=int(sys.argv[3]), json_path=sys.argv[4])
dt = time.perf_counter() - t
print(json.dumps({"seconds": dt, "dice": [s["per_class_mean"][c]["dice"] for c in (1, 2)]}))
"""

MEDSEG_SERIAL = """
import json, sys, time
from pathlib import Path
from medseg3d.evaluation.evaluate import CasePair, evaluate_case
names = sorted(p.name for p in Path(sys.argv[1]).glob("*.nii.gz"))
t = time.perf_counter()
for n in names:
    evaluate_case(CasePair(n, Path(sys.argv[1]) / n, Path(sys.argv[2]) / n), [1, 2])
print(json.dumps({"seconds": time.perf_counter() - t}))
"""

NNUNET_SERIAL = """
import json, sys, time
from pathlib import Path
from nnunetv2.evaluation.evaluate_predictions import compute_metrics
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
rw = SimpleITKIO()
names = sorted(p.name for p in Path(sys.argv[1]).glob("*.nii.gz"))
t = time.perf_counter()
for n in names:
    compute_metrics(str(Path(sys.argv[2]) / n), str(Path(sys.argv[1]) / n), rw, [1, 2])
print(json.dumps({"seconds": time.perf_counter() - t}))
"""

NNUNET_API = """
import json, sys, time
from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder_simple
t = time.perf_counter()
compute_metrics_on_folder_simple(sys.argv[2], sys.argv[1], [1, 2], sys.argv[4], int(sys.argv[3]), chill=True)
dt = time.perf_counter() - t  # the function returns None; its summary is the JSON file it wrote
s = json.load(open(sys.argv[4]))
print(json.dumps({"seconds": dt, "dice": [s["mean"][c]["Dice"] for c in ("1", "2")]}))
"""


def make_predictions(ref_dir: Path, out_dir: Path, seed: int = 0) -> int:
    """Write a perturbed copy of every reference label into `out_dir`; returns the number of cases."""
    rng = np.random.default_rng(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = 0
    for path in sorted(ref_dir.glob("*.nii.gz")):
        if path.name.startswith("."):
            continue
        img = nib.load(str(path))
        label = np.asarray(img.dataobj).astype(np.uint8)
        pred = ndimage.shift(label, tuple(int(s) for s in rng.integers(-1, 2, 3)), order=0)
        grow = ndimage.binary_dilation(pred == 1) & (pred == 0) & (rng.random(pred.shape) < 0.3)
        pred[grow] = 1
        noise = rng.random(pred.shape) < 0.002
        pred[noise] = rng.integers(1, 3, int(noise.sum()))
        nib.save(nib.Nifti1Image(pred.astype(np.uint8), img.affine, img.header), str(out_dir / path.name))
        n += 1
    return n


def _run(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall, proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("/work/shared/data/Task04_Hippocampus/labelsTr"))
    parser.add_argument("--bench-python", type=Path, default=Path("/work/venv-bench/bin/python"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    env = dict(os.environ, OMP_NUM_THREADS="1", nnUNet_raw="/tmp", nnUNet_preprocessed="/tmp", nnUNet_results="/tmp")
    bench_bin = args.bench_python.parent
    medseg_cli = [sys.executable, "-m", "medseg3d"]
    times: dict[str, list[float]] = {f"{tool} {kind}": [] for kind in ("API", "CLI", "serial")
                                     for tool in ("medseg3d", "nnU-Net")}
    dice: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n = make_predictions(args.data, tmp / "pred")
        w = str(args.workers)
        for r in range(args.rounds):
            for tool in alternating(["medseg3d", "nnU-Net"], r):
                if tool == "medseg3d":
                    _, out = _run([sys.executable, "-c", MEDSEG_API, str(tmp / "pred"), str(args.data), w,
                                   str(tmp / "m.json")], env)
                    wall, _ = _run([*medseg_cli, "evaluate", str(tmp / "pred"), str(args.data), "--labels", "1,2",
                                    "--workers", w, "--json", str(tmp / "m2.json")], env)
                    _, serial = _run([sys.executable, "-c", MEDSEG_SERIAL, str(tmp / "pred"), str(args.data)], env)
                else:
                    py = str(args.bench_python)
                    _, serial = _run([py, "-c", NNUNET_SERIAL, str(tmp / "pred"), str(args.data)], env)
                    _, out = _run([py, "-c", NNUNET_API, str(tmp / "pred"), str(args.data), w, str(tmp / "n.json")], env)
                    wall, _ = _run([str(bench_bin / "nnUNetv2_evaluate_simple"), str(args.data), str(tmp / "pred"),
                                    "-l", "1", "2", "-np", w, "-o", str(tmp / "n2.json")], env)
                result = json.loads(out.strip().splitlines()[-1])
                times[f"{tool} API"].append(result["seconds"])
                times[f"{tool} CLI"].append(wall)
                times[f"{tool} serial"].append(json.loads(serial.strip().splitlines()[-1])["seconds"])
                dice[tool] = result["dice"]
                print(f"round {r} {tool}: API {result['seconds']:.2f} s, CLI {wall:.2f} s, "
                      f"serial {times[f'{tool} serial'][-1]:.2f} s", file=sys.stderr)
    med = {k: statistics.median(v) for k, v in times.items()}
    report = {
        "cases": n, "workers": args.workers, "rounds": args.rounds, "median_seconds": med,
        "all_seconds": times, "mean_dice_per_class": dice,
        "speedup_api": med["nnU-Net API"] / med["medseg3d API"],
        "speedup_cli": med["nnU-Net CLI"] / med["medseg3d CLI"],
        "speedup_serial": med["nnU-Net serial"] / med["medseg3d serial"],
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
