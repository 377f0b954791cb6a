"""The CLI reference in Markdown, generated from the typer app (docs/cli.md is its output).

`python -m medseg3d.clidoc > docs/cli.md` regenerates it; a test keeps the file in step.
"""

from __future__ import annotations

import typer


def _default(param) -> str:  # noqa: ANN001 - a click parameter (typer vendors click in new releases)
    value = param.default
    if value is None or callable(value) or getattr(param, "is_flag", False) and value is False:
        return ""
    return f" (default: `{value}`)"


def cli_reference() -> str:
    """Markdown: one section per command with its arguments and options, from the live app."""
    from medseg3d.cli import app

    root = typer.main.get_command(app)
    lines = ["# CLI reference", "", "Generated from the typer app by `python -m medseg3d.clidoc > docs/cli.md`;",
             "`tests/test_cli_reference.py` fails when this file and the app disagree.", "",
             "Every command accepts `--help`; `--debug` anywhere shows a traceback instead of the one-paragraph",
             "error; user errors exit with code 2.", ""]
    for name in sorted(root.commands):
        cmd = root.commands[name]
        lines += [f"## `medseg3d {name}`", "", (cmd.help or "").strip().split("\n\n")[0].replace("\n", " "), ""]
        for param in cmd.params:
            if param.name == "help":
                continue
            if param.param_type_name == "argument":
                lines.append(f"- `{param.name.upper()}`{' (required)' if param.required else ''}: "
                             f"{getattr(param, 'help', '') or ''}")
            else:
                opts = ", ".join(f"`{o}`" for o in (*param.opts, *param.secondary_opts))
                lines.append(f"- {opts}: {(param.help or '').strip()}{_default(param)}")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(cli_reference(), end="")
