"""Logging set-up shared by every command: rich output on stderr, plain text in files."""

from __future__ import annotations

import logging
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler

#: One console for progress bars and log lines, on stderr so stdout stays machine-readable.
console = Console(stderr=True)


def setup_logging(verbose: bool = False) -> None:
    """Send `medseg3d.*` log records to the terminal (INFO, or DEBUG when `verbose`)."""
    logger = logging.getLogger("medseg3d")
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not any(isinstance(h, RichHandler) for h in logger.handlers):
        handler = RichHandler(console=console, show_path=False, show_time=False, markup=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.propagate = False


def add_file_log(path: Path) -> logging.Handler:
    """Also write `medseg3d.*` records to `path` (appending); returns the handler to remove later."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("medseg3d").addHandler(handler)
    return handler
