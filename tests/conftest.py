"""Suite-wide fixtures."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The suite's ONNX exports (`--backend auto` on the CPU runs OpenVINO where it is installed) go to
    a cache of its own, not the user's `~/.cache/medseg3d`."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg_cache"))
