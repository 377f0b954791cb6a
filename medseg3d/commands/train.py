"""`medseg3d train` (being written; registers nothing yet)."""

import typer


def register(app: typer.Typer) -> None:
    """Add the `train` command to `app`."""
