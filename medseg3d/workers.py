"""The one check of a worker count (`--workers/-j` of verify, plan, evaluate; `parallel_map`)."""

from __future__ import annotations

from medseg3d.errors import InputError


def resolve_workers(workers: int | None, automatic: int) -> int:
    """Parallel workers to use: `workers`, or `automatic` when it is None or 0.

    A negative count raises `InputError` (the CLI prints it, exit 2) instead of a pool's ValueError.
    """
    if workers is not None and workers < 0:
        raise InputError(f"--workers/-j {workers}: give 0 (automatic) or a positive number of parallel workers")
    return max(1, int(workers or automatic))
