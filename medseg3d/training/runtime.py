"""How a training run executes on this machine: device, precision, memory format, compilation, workers.

Each choice is the user's where given (`TrainConfig`), else a default measured on the hardware it
applies to (docs/benchmarks.md): bf16 AMP on CUDA and on CPUs with native bf16; on other CPUs fp32
with channels-last memory and, for long 3D runs, `torch.compile`; augmentation workers per device.
The training loop (`medseg3d.training.trainer`) only asks these functions.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Any

import torch

from medseg3d.training.config import TrainConfig


def amp_setup(device: torch.device, enabled: bool | None) -> tuple[torch.dtype | None, Any]:
    """(autocast dtype or None, GradScaler or None): bf16 where supported, fp16 + scaler on older GPUs.

    `enabled=None` means on for CUDA, and on the CPU where oneDNN has native bf16 (AVX512-bf16/AMX):
    there bf16 autocast trained 2.2x faster than fp32 (docs/benchmarks.md); fp32 on other CPUs.
    """
    if enabled is None:
        enabled = device.type == "cuda" or _cpu_has_bf16()
    if not enabled:
        return None, None
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, None
        return torch.float16, torch.amp.GradScaler("cuda")
    return torch.bfloat16, None


# torch.compile costs 0.5-2 min on 2 CPU cores, then saves about a fifth of every fp32 iteration at
# the hippocampus plan over channels-last eager (9.7 -> 8.0 s, docs/benchmarks.md): worth it from
# a few hundred iterations on.
COMPILE_MIN_ITERATIONS = 500


def use_channels_last(tc: TrainConfig, device: torch.device, dims: int, amp_dtype: torch.dtype | None) -> bool:
    """`tc.channels_last`, or by default: 3D, fp32, CPU.

    oneDNN's channels-last (ndhwc) convolutions on an AVX2 CPU ran the plan's 32->32 3x3x3 conv
    forward + backward 1.6x faster than on contiguous memory (which it reorders to blocked and
    back on every call). Not the default under AMP or on CUDA, where it is not measured.
    """
    if tc.channels_last is not None:
        return bool(tc.channels_last)
    return device.type == "cpu" and dims == 3 and amp_dtype is None


def use_compile(tc: TrainConfig, device: torch.device, dims: int, amp_dtype: torch.dtype | None) -> bool:
    """`tc.compile`, or by default: 3D fp32 on the CPU, a C++ compiler present, a run long enough to repay it.

    (nnU-Net does not compile on the CPU at all: it reports crashes with 2D models, hence 3D only.)
    """
    if tc.compile is not None:
        return bool(tc.compile)
    return (device.type == "cpu" and dims == 3 and amp_dtype is None
            and tc.epochs * tc.iterations_per_epoch >= COMPILE_MIN_ITERATIONS and _cpp_compiler_available())


def _cpp_compiler_available() -> bool:
    """Inductor's CPU backend builds C++ kernels: $CXX, g++ or clang++ must exist."""
    return any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c)


def _cpu_has_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def default_workers(device: torch.device, cpus: int | None = None, gpus_here: int | None = None) -> int:
    """Augmentation workers per training process: 1 on the CPU (the trainer needs the cores);
    on CUDA nnU-Net's 12 per GPU, within this machine's cores shared by its GPUs' processes.

    One worker builds a batch of the hippocampus plan in 0.19 s of CPU (benchmarks/bench_loader.py),
    so a GPU step shorter than 0.19 s / workers waits for data: 16 ms with 12 workers, 47 ms with 4.
    """
    if device.type != "cuda":
        return 1
    cpus = cpus or os.cpu_count() or 1
    gpus_here = gpus_here or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(12, cpus // max(1, gpus_here) - 1))


@dataclass
class Runtime:
    """The resolved execution choices of one training process (what `resolve_runtime` decided).

    Recorded in every checkpoint as `runtime` (`to_dict`) and printed in the train log (`describe`).
    `compile` turns False when the compiled model's first step fails and training goes on eager.
    """

    device: torch.device
    amp_dtype: torch.dtype | None      # autocast dtype; None: fp32
    scaler: Any                        # torch.amp.GradScaler (fp16 on GPUs without bf16) or None
    channels_last: bool
    compile: bool
    workers: int                       # augmentation worker processes of this training process
    world_size: int = 1                # DDP processes

    @property
    def precision(self) -> str:
        """`fp32`, `bf16 AMP` or `fp16 AMP + GradScaler`."""
        if self.amp_dtype is None:
            return "fp32"
        name = str(self.amp_dtype).replace("torch.", "").replace("bfloat16", "bf16").replace("float16", "fp16")
        return f"{name} AMP" + (" + GradScaler" if self.scaler is not None else "")

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the checkpoint: device, precision, channels_last, compile, workers, world_size."""
        return {"device": str(self.device), "precision": self.precision, "channels_last": self.channels_last,
                "compile": self.compile, "workers": self.workers, "world_size": self.world_size}

    def describe(self) -> str:
        """One log line, e.g. `device cpu, fp32, channels-last on, torch.compile off, 1 data worker`."""
        return (f"device {self.device}, {self.precision}, channels-last {'on' if self.channels_last else 'off'}, "
                f"torch.compile {'on' if self.compile else 'off'}, {self.workers} data worker"
                f"{'' if self.workers == 1 else 's'}" + (f", {self.world_size} DDP processes"
                                                         if self.world_size > 1 else ""))


def resolve_runtime(tc: TrainConfig, device: torch.device, dims: int, world_size: int = 1) -> Runtime:
    """Every execution choice of a run on `device` for a `dims`-D configuration: the user's, else the default."""
    amp_dtype, scaler = amp_setup(device, tc.amp)
    return Runtime(device=device, amp_dtype=amp_dtype, scaler=scaler,
                   channels_last=use_channels_last(tc, device, dims, amp_dtype),
                   compile=use_compile(tc, device, dims, amp_dtype),
                   workers=tc.num_workers if tc.num_workers is not None else default_workers(device),
                   world_size=world_size)
