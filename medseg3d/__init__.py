"""medseg3d: self-configuring 3D medical image segmentation (plan, train, predict, evaluate).

`from medseg3d import Segmenter` gives the Python API (`medseg3d.api`), imported on first use so
that `import medseg3d` stays cheap (no torch).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["Segmenter", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Segmenter":
        from medseg3d.api import Segmenter

        return Segmenter
    raise AttributeError(f"module 'medseg3d' has no attribute {name!r}")
