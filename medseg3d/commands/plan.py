"""`medseg3d plan` (being written; registers nothing yet)."""

import typer


def register(app: typer.Typer) -> None:
    """Add the `plan` command to `app`."""
