"""`medseg3d verify` (being written; registers nothing yet)."""

import typer


def register(app: typer.Typer) -> None:
    """Add the `verify` command to `app`."""
