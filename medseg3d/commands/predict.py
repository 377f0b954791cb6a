"""`medseg3d predict` (being written; registers nothing yet)."""

import typer


def register(app: typer.Typer) -> None:
    """Add the `predict` command to `app`."""
