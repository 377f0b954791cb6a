"""The `ddp` part of the GPU suite: torchrun as a user types it, and the same run with the process group forced."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gpu_common import (
    FOLDS,
    HERE,
    TINY,
    _device,
    _planned_work,
    clear_fold,
    cli_in_process,
    floats,
    fold_dir,
    free_port,
    metrics_rows,
    run_captured,
    status_of,
    tail,
    write_json,
)


def part_ddp(spec: dict) -> dict:
    """torchrun --nproc_per_node 1: the user's command, and the same with the process group forced (NCCL/gloo)."""
    dev, dry = _device(spec), spec["dry_run"]
    work, plan_source = _planned_work(spec)
    backend = "nccl" if dev == "cuda" else "gloo"
    common = ["--epochs", "1", "--iterations-per-epoch", "3" if dry else "10", "--val-iterations", "1",
              "--no-final-validation", "--device", dev] + (TINY + ["--num-workers", "1"] if dry else [])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1"]
    scratch = Path(spec["scratch"])
    forced_report = scratch / "ddp_forced.json"
    forced_report.unlink(missing_ok=True)
    runs: dict[str, dict] = {}
    for name, fold, cmd in (
        ("plain", FOLDS["ddp_plain"], torchrun + ["--master_port", str(free_port()), "-m", "medseg3d", "train",
                                                  str(work), "--fold", str(FOLDS["ddp_plain"]), *common]),
        ("forced", FOLDS["ddp_forced"], torchrun + ["--master_port", str(free_port()), str(HERE), "--ddp-forced",
                                                    str(forced_report), "--", "train", str(work), "--fold",
                                                    str(FOLDS["ddp_forced"]), *common]),
    ):
        clear_fold(work, fold)
        left = spec["deadline"] - time.time()
        res = run_captured(cmd, max(10.0, left / (2 if name == "plain" else 1) - 3), dict(os.environ))
        text = res["stdout"] + res["stderr"]
        rows = metrics_rows(fold_dir(work, fold))
        runs[name] = {"exit_code": res["rc"], "seconds": res["seconds"], "epochs": len(rows),
                      "train_loss": floats(rows, "train_loss"),
                      "joined_process_group": "process group" in text and "joined" in text,
                      "output_tail": "" if res["rc"] == 0 else tail(text, 2500)}
    forced = json.loads(forced_report.read_text()) if forced_report.is_file() else {}
    runs["forced"]["process_group"] = forced
    checks = {"plain_exit_0": runs["plain"]["exit_code"] == 0, "plain_trained": runs["plain"]["epochs"] >= 1,
              "forced_exit_0": runs["forced"]["exit_code"] == 0, "forced_trained": runs["forced"]["epochs"] >= 1,
              f"forced_backend_{backend}": forced.get("backend") == backend,
              "forced_ddp_wrapped": forced.get("ddp_wrapped", 0) >= 1,
              "forced_all_reduce_ran": forced.get("all_reduce_calls", 0) >= 1,
              "losses_finite": all(math.isfinite(v) for r in ("plain", "forced") for v in runs[r]["train_loss"])}
    finding = None
    if not runs["plain"]["joined_process_group"]:
        finding = ("torchrun --nproc_per_node 1 trains without a process group: init_distributed() joins one only "
                   "for WORLD_SIZE > 1, so the plain run exercises no DDP code; the forced run does "
                   f"({forced.get('backend', '?')}).")
    return {"status": status_of(checks), "checks": checks, "device": dev, "backend_expected": backend,
            "work": plan_source, "runs": runs, "finding": finding}


def ddp_forced_main(report: Path, argv: list[str]) -> int:
    """Under torchrun: `medseg3d train` with the process group joined at any WORLD_SIZE (here 1), recorded."""
    import torch
    import torch.distributed as dist

    from medseg3d.training import distributed as mdist
    from medseg3d.training import trainer

    seen: dict[str, Any] = {"ddp_wrapped": 0, "all_reduce_calls": 0}

    class ForcedInfo(mdist.DistInfo):
        @property
        def enabled(self) -> bool:  # DDP code paths at world size 1 too
            return True

    def init_forced(device_kind: str) -> mdist.DistInfo:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device_kind == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
        seen.update(backend=str(dist.get_backend()), world_size=dist.get_world_size(), rank=dist.get_rank())
        print(f"gpu_suite: rank {rank}/{world} joined the {seen['backend']} process group (forced at world size "
              f"{world})", flush=True)
        return ForcedInfo(rank, world, local)

    ddp_init = torch.nn.parallel.DistributedDataParallel.__init__

    def counting_init(self, *a: Any, **k: Any) -> None:
        seen["ddp_wrapped"] += 1
        seen["device_ids"] = str(k.get("device_ids"))
        ddp_init(self, *a, **k)

    all_reduce = dist.all_reduce

    def counting_all_reduce(*a: Any, **k: Any) -> Any:
        seen["all_reduce_calls"] += 1
        return all_reduce(*a, **k)

    torch.nn.parallel.DistributedDataParallel.__init__ = counting_init  # type: ignore[method-assign]
    dist.all_reduce = counting_all_reduce
    trainer.init_distributed = init_forced
    rc = 1
    try:
        rc = cli_in_process(argv)
    finally:
        seen["exit_code"] = rc
        write_json(report, seen)
    return rc


