"""`medseg3d demo` (being written; registers nothing yet)."""

import typer


def register(app: typer.Typer) -> None:
    """Add the `demo` command to `app`."""
