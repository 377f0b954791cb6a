"""`medseg3d verify DATA_DIR`: check a dataset and print a summary, or every problem found."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from medseg3d.logging_utils import console


def print_summary(summary) -> None:  # noqa: ANN001 - DatasetSummary, imported lazily
    """Print the short summary of a verified dataset on the console."""
    spec = summary.spec
    (smin, smax), (hmin, hmax) = summary.spacing_range(), summary.shape_range()
    table = Table(title=f"{spec.name} ({spec.layout} layout) is valid", show_header=False)
    table.add_row("cases", str(summary.num_cases) + (f" (+{len(spec.test_cases)} test)" if spec.test_cases else ""))
    table.add_row("channels", f"{spec.num_channels}: " + ", ".join(f"{i} {n}" for i, n in enumerate(spec.channel_names)))
    table.add_row("labels", ", ".join(f"{i} {n}" for i, n in sorted(spec.labels.items())))
    table.add_row("spacing (mm)", f"{smin} .. {smax}")
    table.add_row("shape (voxels)", f"{hmin} .. {hmax}")
    table.add_row("checked in", f"{summary.seconds:.2f} s")
    console.print(table)


def register(app: typer.Typer) -> None:
    """Add the `verify` command to `app`."""

    @app.command("verify")
    def verify(
        data_dir: Path = typer.Argument(..., help="Dataset folder (MSD or nnU-Net v2 layout) holding dataset.json."),
        workers: int = typer.Option(0, "--workers", "-j", help="Parallel readers (0 = automatic)."),
    ) -> None:
        """Check a dataset: files, channels, shapes, geometry, label values, NaN/Inf. Lists every problem."""
        from medseg3d.io import verify_dataset

        print_summary(verify_dataset(data_dir, workers=workers or None))
