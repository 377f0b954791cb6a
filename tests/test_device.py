"""`--device` names resolve in one place, with the same errors for train and predict."""

from __future__ import annotations

import pytest
import torch

from medseg3d.device import resolve_device
from medseg3d.errors import InputError


def test_names_resolve(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(InputError, match="no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(InputError, match="unknown device 'gpu'"):
        resolve_device("gpu")  # once silently the CPU for training
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cuda", local_rank=3) == torch.device("cuda", 3)
