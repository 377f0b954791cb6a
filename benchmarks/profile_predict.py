"""Where `medseg3d predict`'s time goes: interpreter and imports, model loading, then per phase of the cases.

    python benchmarks/profile_predict.py --work-dir /tmp/bench_backends/wd --input /tmp/bench_backends/in_medseg \
        --backend torch --threads 2 [--no-tta]

Runs `predict_folder` once under cProfile (in this process, `--threads` torch threads) and prints the
cumulative seconds of each phase: loading the fold networks (and, for onnxruntime/openvino, the
in-memory ONNX export and session creation), reading, preprocessing, the network calls inside the
sliding window, the rest of the sliding window (cropping windows, flips, softmax, Gaussian
accumulation), the export to the original grid and writing; `imports` is the time to import torch and
medseg3d's predict path, measured before profiling. `bench_backends.py` makes the WORK_DIR and input.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-dir", required=True)
    ap.add_argument("--input", required=True)
    ap.add_argument("--output", default="/tmp/profile_predict_out")
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-tta", action="store_true")
    args = ap.parse_args()
    t0 = time.perf_counter()
    import torch

    torch.set_num_threads(args.threads)
    from medseg3d.inference.folder import predict_folder

    imports = time.perf_counter() - t0
    prof = cProfile.Profile()
    t1 = time.perf_counter()
    prof.enable()
    summary = predict_folder(args.work_dir, args.input, args.output, device="cpu", precision=args.precision,
                             use_mirroring=not args.no_tta, overwrite=True, backend=args.backend)
    prof.disable()
    total = time.perf_counter() - t1
    stats = pstats.Stats(prof).stats

    def cum(*patterns: str) -> float:
        return sum(v[3] for k, v in stats.items() for p in patterns if p in f"{k[0]}:{k[2]}")

    network = cum("sliding_window.py:_run_batch")
    calls = {"torch": cum("module.py:_call_impl"), "onnxruntime": cum("backends.py:forward"),
             "openvino": cum("backends.py:forward")}[args.backend]
    phases = {
        "imports (torch, medseg3d predict path)": imports,
        "load fold networks (+ export, sessions)": cum("folder.py:load_fold_models", "backends.py:to_backend"),
        "read": cum("io/__init__.py:read_volume", "io/volume.py:read_volume"),
        "preprocess (crop, normalise, resample)": cum("pipeline.py:preprocess_arrays"),
        "network calls": min(calls, network) if calls else network,
        "sliding window, the rest": network - (min(calls, network) if calls else 0.0),
        "export to the original grid": cum("predictor.py:probabilities_to_seg", "pipeline.py:probs_to_original",
                                           "crop.py:uncrop"),
        "write": cum("writer.py:write_segmentation"),
    }
    phases["other"] = total - sum(v for k, v in phases.items() if not k.startswith("imports"))
    report = {"backend": args.backend, "tta": not args.no_tta, "threads": args.threads, "cases": len(summary.predicted),
              "predict_folder_s": total, "phases_s": phases}
    print(json.dumps(report, indent=1))
    for k, v in phases.items():
        print(f"| {k} | {v:.2f} | {100 * v / (total + imports):.1f}% |", file=sys.stderr)


if __name__ == "__main__":
    main()
