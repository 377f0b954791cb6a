"""docs/cli.md is generated from the typer app and must stay in step with it."""

from pathlib import Path

from medseg3d.clidoc import cli_reference

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


def test_cli_reference_is_current():
    expected = cli_reference()
    for command in ("verify", "plan", "train", "predict", "evaluate", "demo"):
        assert f"## `medseg3d {command}`" in expected
    assert DOC.read_text() == expected, "docs/cli.md is stale: run `python -m medseg3d.clidoc > docs/cli.md`"
