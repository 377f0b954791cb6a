"""What one augmentation worker delivers: CPU seconds per training batch, sampling vs augmentation.

A worker builds each batch from the memory-mapped cache (`sample_patch`, the enlarged box of the
spatial transform) and augments it (`augment_batch`, batched torch, one thread). On a GPU the
trainer waits for data when `step time < batch time / workers`; this reports the batch time of one
worker so that bound can be read off for any worker count, without a GPU:

    python benchmarks/bench_loader.py /tmp/h04 --config 3d_fullres --batches 20

(/tmp/h04 = `medseg3d plan ../shared/data/Task04_Hippocampus -o /tmp/h04`.) Batch size and patch
are the plan's unless given.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work", type=Path)
    ap.add_argument("--config", default="3d_fullres")
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--workers", default="1,2,4,8,12", help="worker counts to tabulate the GPU-step bound for")
    args = ap.parse_args()
    torch.set_num_threads(1)  # as in a DataLoader worker

    from medseg3d.data.augment import augment_batch, augment_params_for
    from medseg3d.data.loader import BatchStream, StreamSpec, enlarged_patch
    from medseg3d.plans import Plans
    from medseg3d.preprocess.cache import labelled_cases

    plans = Plans.load(args.work / "plans.json")
    cfg = plans.configuration(args.config)
    params = augment_params_for(cfg.patch_size, cfg.mirror_axes)
    batch = args.batch_size or cfg.batch_size
    spec = StreamSpec(args.work, cfg.data_identifier, labelled_cases(args.work, cfg.data_identifier),
                      tuple(cfg.patch_size), batch, cfg.slice_axis, 0.33, params, seed=0)
    # the same stream without augmentation, cutting the enlarged box the spatial transform needs
    sampler = BatchStream(StreamSpec(**{**spec.__dict__, "augment": None,
                                        "patch_size": enlarged_patch(spec.patch_size, params)}))
    rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)
    for _ in range(2):  # warm the page cache and the mmap
        sampler.batch(rng, gen)
    t_sample = t_aug = 0.0
    for _ in range(args.batches):
        t0 = time.process_time()
        image, label = sampler.batch(rng, gen)
        t1 = time.process_time()
        augment_batch(image, label, tuple(spec.patch_size), params, gen)
        t_sample += t1 - t0
        t_aug += time.process_time() - t1
    per_batch = (t_sample + t_aug) / args.batches
    result = {"work": str(args.work), "config": args.config, "batch_size": batch, "patch": list(spec.patch_size),
              "cpu_s_per_batch": {"sampling": t_sample / args.batches, "augmentation": t_aug / args.batches,
                                  "total": per_batch},
              "gpu_step_below_which_data_waits_s": {w: per_batch / int(w) for w in args.workers.split(",")}}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
