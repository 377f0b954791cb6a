"""`medseg3d evaluate` (being written; registers nothing yet)."""

import typer


def register(app: typer.Typer) -> None:
    """Add the `evaluate` command to `app`."""
