"""The timed children of the prediction benchmarks: one tool, one run, in a fresh process.

`run_child(kind, spec, tag, workdir)` runs `python benchmarks/_child.py KIND SPEC RESULT` with
`spec["threads"]` torch, OpenMP and MKL threads, waits for it (one child at a time) and returns what
the child wrote plus its peak RSS (MB, `ru_maxrss`), wall seconds (interpreter start and imports
included) and the load average before and after. Kinds:

  medseg   `predict_folder` on `spec["input"]` (backend, precision, step, TTA from the spec)
  nnunet   nnU-Net v2's `nnUNetPredictor.predict_from_files_sequential`, case by case, on a randomly
           initialised network of the plan in `spec["nnunet_plans"]` (speed does not depend on weights)

Used by `bench_predict.py` and `bench_backends.py`, so both time the same thing the same way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _fair import load_average


def child_medseg(spec: dict) -> dict:
    """One predict_folder run; seconds per case (sorted) and in all."""
    import torch

    torch.set_num_threads(spec["threads"])
    from medseg3d.inference.folder import predict_folder

    t0 = time.perf_counter()
    s = predict_folder(spec["work_dir"], spec["input"], spec["output"], config="3d_fullres", step=spec["step"],
                       use_mirroring=spec["tta"], device="cpu", overwrite=True, precision=spec["precision"],
                       backend=spec.get("backend", "torch"),
                       save_probabilities=spec.get("save_probabilities", False))
    return {"cases": len(s.predicted), "total_s": time.perf_counter() - t0, "per_case_s": sorted(s.seconds.values())}


def child_nnunet(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = json.loads(Path(spec["nnunet_plans"]).read_text())
    dataset_json = json.loads(Path(spec["nnunet_dataset_json"]).read_text())
    pm = PlansManager(plans)
    cm = pm.get_configuration("3d_fullres")
    arch = cm.network_arch_init_kwargs
    torch.manual_seed(0)
    net = get_network_from_plans(cm.network_arch_class_name, arch, cm.network_arch_init_kwargs_req_import,
                                 len(dataset_json["channel_names"]), len(dataset_json["labels"]),
                                 allow_init=True, deep_supervision=False)
    pred = nnUNetPredictor(tile_step_size=spec["step"], use_gaussian=True, use_mirroring=spec["tta"],
                           perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    pred.manual_initialization(net, pm, cm, [net.state_dict()], dataset_json, "nnUNetTrainer",
                               tuple(spec["mirror_axes"]))
    inputs = sorted(Path(spec["input"]).glob("*_0000.nii*"))
    lists = [[str(p)] for p in inputs]
    outs = [str(Path(spec["output"]) / p.name.split("_0000")[0]) for p in inputs]
    Path(spec["output"]).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    per = []
    for li, of in zip(lists, outs):
        t = time.perf_counter()
        pred.predict_from_files_sequential([li], [of], save_probabilities=False, overwrite=True)
        per.append(time.perf_counter() - t)
    total = time.perf_counter() - t0
    return {"cases": len(lists), "total_s": total, "per_case_s": sorted(per)}


def run_child(kind: str, spec: dict, tag: str, workdir: Path) -> dict:
    """Run one tool in a fresh process; its timings plus peak RSS (MB), wall seconds and load averages."""
    spec_path, res_path = workdir / f"spec_{tag}.json", workdir / f"res_{tag}.json"
    spec_path.write_text(json.dumps(spec))
    threads = str(spec["threads"])
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    cmd = [sys.executable, __file__, kind, str(spec_path), str(res_path)]
    load = load_average()
    t0 = time.perf_counter()
    with open(workdir / f"log_{tag}.txt", "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if status != 0:
        raise SystemExit(f"{tag} failed; see {workdir / f'log_{tag}.txt'}")
    out = json.loads(res_path.read_text())
    out.update({"peak_rss_mb": usage.ru_maxrss / 1024, "process_wall_s": wall, "load_before": load,
                "load_after": load_average()})
    return out


if __name__ == "__main__":
    kind, spec_file, result_file = sys.argv[1:4]
    run = {"medseg": child_medseg, "nnunet": child_nnunet}[kind]
    Path(result_file).write_text(json.dumps(run(json.loads(Path(spec_file).read_text()))))
