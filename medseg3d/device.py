"""The one place a `--device` name becomes a `torch.device` (train, predict, the demo, benchmarks)."""

from __future__ import annotations

import torch

from medseg3d.errors import InputError

DEVICE_CHOICES = ("auto", "cuda", "cpu")


def resolve_device(name: str | torch.device, local_rank: int | None = None) -> torch.device:
    """`auto` -> CUDA when torch sees a GPU, else CPU; `cuda`, `cuda:N` or `cpu` as given.

    `local_rank`: under DDP on CUDA, the rank's GPU (`cuda:LOCAL_RANK`) replaces the index.
    InputError (exit 2) for `cuda` without a visible GPU and for an unknown name.
    """
    text = str(name)
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise InputError(f"--device {text} was asked for but torch sees no CUDA GPU; use --device cpu or auto")
        if local_rank is not None:
            return torch.device("cuda", local_rank)
        try:
            return torch.device(text)
        except RuntimeError as exc:
            raise InputError(f"--device {text!r} is not a device name; use auto, cpu, cuda or cuda:N") from exc
    raise InputError(f"unknown device {text!r}; use one of {', '.join(DEVICE_CHOICES)} (or cuda:N)")
