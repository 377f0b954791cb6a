"""`medseg3d demo`: verify, plan, train briefly, predict and evaluate on the shipped data."""

from __future__ import annotations

from pathlib import Path

import typer

from medseg3d.demo import DemoSchedule
from medseg3d.logging_utils import console


def register(app: typer.Typer) -> None:
    """Add the `demo` command to `app`."""

    @app.command("demo")
    def demo(
        out: Path = typer.Option(Path("medseg3d_demo"), "--out", "-o", help="Folder for every artefact of the demo."),
        device: str = typer.Option("auto", "--device", help="auto, cuda or cpu."),
        epochs: int = typer.Option(DemoSchedule.epochs, "--epochs", min=1,
                                   help="Training epochs (a finished model already in --out is reused)."),
        iterations: int = typer.Option(DemoSchedule.iterations_per_epoch, "--iterations-per-epoch", min=1,
                                       help="Training iterations per epoch."),
        time_budget: float = typer.Option(DemoSchedule.time_budget_s, "--time-budget", min=1,
                                          help="Seconds of training at most; fewer epochs run on a slow machine."),
    ) -> None:
        """Whole pipeline on 20 shipped hippocampus MRI cases (16 train, 4 held out); ~10 min on 2 CPU cores."""
        from medseg3d.commands.evaluate import summary_table
        from medseg3d.commands.verify import print_summary
        from medseg3d.demo import run_demo
        from medseg3d.errors import ConfigError

        if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
            raise ConfigError(f"--device must be auto, cpu or cuda (got {device!r})")
        schedule = DemoSchedule(epochs=epochs, iterations_per_epoch=iterations, time_budget_s=time_budget)
        summary = run_demo(out, device=device, schedule=schedule, on_verified=print_summary)
        console.print(summary_table(summary, "medseg3d demo: held-out hippocampus cases"))
        dice = summary["mean"]["dice"]
        console.print(f"mean foreground Dice on the {summary['num_cases']} held-out cases: {dice:.4f}")
        times = ", ".join(f"{k} {v:.0f} s" for k, v in summary["timings_s"].items())
        console.print(f"time: {times}")
        for name, where in summary["artefacts"].items():
            console.print(f"  {name:<13} {where}")
