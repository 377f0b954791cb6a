"""The `medseg3d` command line: a thin typer layer over the stage functions.

Every command lives in `medseg3d/commands/<name>.py` and registers itself on `app`. Errors of the
project's own (`MedsegError`), CUDA running out of memory (the message says which options to lower)
and permission / read-only / full-disk errors (naming the path) become one readable message and exit
code 2 (`medseg3d.errors.user_error`); `--debug` anywhere on the command line shows the traceback instead.
"""

from __future__ import annotations

import logging
import sys

import typer

from medseg3d import __version__
from medseg3d.errors import user_error

app = typer.Typer(
    name="medseg3d",
    help="Self-configuring 3D medical image segmentation: verify, plan, train, predict, evaluate, demo.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

log = logging.getLogger("medseg3d")


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"medseg3d {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages."),
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Self-configuring 3D medical image segmentation. Add --debug to any command to see tracebacks."""
    from medseg3d.logging_utils import setup_logging

    setup_logging(verbose)


#: The order of the commands in `--help`; any other module of `medseg3d.commands` follows, alphabetically.
COMMAND_ORDER = ("verify", "plan", "train", "predict", "evaluate", "demo")


def _register_commands() -> None:
    """Every module of `medseg3d.commands` with a `register(app)` adds its command (a new command is one file)."""
    import importlib
    import pkgutil

    import medseg3d.commands as commands

    names = [m.name for m in pkgutil.iter_modules(commands.__path__) if not m.name.startswith("_")]
    names.sort(key=lambda n: (COMMAND_ORDER.index(n) if n in COMMAND_ORDER else len(COMMAND_ORDER), n))
    for name in names:
        module = importlib.import_module(f"medseg3d.commands.{name}")
        if hasattr(module, "register"):
            module.register(app)


_register_commands()


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script: run the app and turn our errors into exit code 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    try:
        app(args=args, prog_name="medseg3d")  # standalone: usage errors exit 2 the way typer does
    except KeyboardInterrupt:
        typer.echo("Interrupted.", err=True)
        sys.exit(130)
    except Exception as exc:
        known = None if debug else user_error(exc, _command_of(args))
        if known is None:
            raise
        typer.echo(f"Error: {known}", err=True)
        sys.exit(2)


def _command_of(args: list[str]) -> str | None:
    """The subcommand named on the command line (`train`, `predict`, ...), or None."""
    return next((a for a in args if not a.startswith("-")), None)


if __name__ == "__main__":
    main()
