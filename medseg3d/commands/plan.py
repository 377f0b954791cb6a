"""`medseg3d plan DATA_DIR -o WORK_DIR`: verify, fingerprint, plan, preprocess; `--show WORK_DIR` prints a plan."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.table import Table

from medseg3d.logging_utils import console

_SHOW_KEYS = (
    "dims", "spacing", "slice_axis", "patch_size", "batch_size", "strides", "kernel_sizes", "features",
    "architecture", "median_shape", "mirror_axes", "data_identifier", "previous_stage", "next_stage",
    "estimated_memory_gb",
)


def _fmt(value: object) -> str:
    if isinstance(value, list) and value and isinstance(value[0], list):
        return " ".join("x".join(str(v) for v in s) for s in value)
    if isinstance(value, list):
        return "x".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return "-" if value is None else str(value)


def show_plans(plans) -> None:
    """Print every configuration of `plans` as one table (rows: keys, columns: configurations)."""
    names = list(plans.configurations)
    table = Table(title=f"{plans.dataset_name or 'dataset'}: plans (axes in array order X, Y, Z; mm)")
    table.add_column("key")
    for n in names:
        table.add_column(n)
    for key in _SHOW_KEYS:
        table.add_row(key, *[_fmt(plans.configurations[n].raw.get(key)) for n in names])
    for ch, cname in enumerate(plans.channel_names):
        cells = []
        for n in names:
            norm = plans.configurations[n].normalization[ch]
            extra = f" [{norm['lower']:g}, {norm['upper']:g}]" if norm["scheme"] in ("ct", "rescale") else ""
            cells.append(norm["scheme"] + extra)
        table.add_row(f"norm ch{ch} ({cname})", *cells)
    table.add_row("plan hash", *[plans.network_hash(n)[:12] for n in names])
    archs = sorted({a for n in names for a in plans.configurations[n].planned_architectures})
    for a in archs:
        cells = []
        for n in names:
            view = plans.configurations[n]
            if a not in view.planned_architectures:
                cells.append("-")
                continue
            v = view.for_architecture(a)
            opts = " ".join(f"{k}={_fmt(x)}" for k, x in sorted(v.architecture_options.items()))
            cells.append(f"patch {_fmt(v.raw['patch_size'])}, batch {v.batch_size}, "
                         f"{_fmt(v.raw.get('estimated_memory_gb'))} GB; {opts}")
        table.add_row(f"arch {a}", *cells)
    console.print(table)
    console.print(f"labels: {plans.labels}  schema {plans.schema_version}")
    for n in names:
        show_time_budget(n, plans.configurations[n].time_budget)


def show_time_budget(name: str, entry: dict | None) -> None:
    """Print a configuration's `time_budget` entry: device, each width's timing, the choice and the reason."""
    if not entry:
        return
    from medseg3d.plans.budget import format_duration

    c = entry["choice"]
    table = Table(title=f"{name}: time budget {format_duration(entry['budget_s'])} on {entry['device_name']} "
                        f"({entry['precision']}{', channels-last' if entry['channels_last'] else ''})")
    for col in ("width", "features", "s / iteration", "s / forward", "note"):
        table.add_column(col)
    for t in entry["measured"]:
        s_it, s_fwd = t.get("seconds_per_iteration"), t.get("seconds_per_forward")
        table.add_row(t["width"], _fmt(t["features"]), "-" if s_it is None else f"{s_it:.3f}",
                      "-" if s_fwd is None else f"{s_fwd:.3f}",
                      "chosen" if t["width"] == c["width"] else (t.get("skipped") or ""))
    console.print(table)
    console.print(f"{name} choice: features {_fmt(c['features'])}, patch {_fmt(c['patch_size'])}, batch "
                  f"{c['batch_size']}, {c['optimizer']} lr {c['lr']:g}, {c['epochs']} epochs x "
                  f"{c['iterations_per_epoch']} iterations (+ {c['val_iterations']} validation batches each); "
                  f"{format_duration(c['reserve_s'])} reserved for the final validation, "
                  f"{format_duration(c['expected_s'])} expected in all")
    console.print(f"{name} reason: {entry['reason']}")
    for line in c.get("considered", []):
        console.print(f"  {line}")


def register(app: typer.Typer) -> None:
    """Add the `plan` command to `app`."""

    @app.command("plan")
    def plan(
        folder: Path = typer.Argument(..., help="DATA_DIR to plan (or, with --show alone, the WORK_DIR to print)."),
        output: Path = typer.Option(None, "--output", "-o", help="WORK_DIR for fingerprint, plans.json and the cache."),
        gpu_memory: float = typer.Option(
            None, "--gpu-memory", help="GPU memory budget in GB (default: the CUDA device's total memory "
            "in whole GiB, else 8)."
        ),
        configs: str = typer.Option(
            "", "--configs", help="Comma-separated configurations: 2d,3d_fullres,3d_lowres,3d_cascade_fullres "
            "(default: all the rules call for)."
        ),
        workers: int = typer.Option(0, "--workers", "-j", help="Parallel processes (0 = min(8, CPU count))."),
        arch: str = typer.Option("unet", "--arch", help="Default architecture; other than unet, each configuration "
                                 "also gets a patch, batch and topology sized for that architecture's own memory."),
        arch_option: list[str] = typer.Option([], "--arch-option",
                                              help="key=value option of --arch, repeatable (stored in the plan)."),
        time_budget: str | None = typer.Option(
            None, "--time-budget", help="Time for one fold's training plus its final validation (60m, 1.5h, 900s, "
            "900 = seconds): times a few training steps of candidate widths on this machine and chooses network "
            "width, optimiser, lr and epochs x iterations to fit (stored in plans.json). Default: nnU-Net's plan."
        ),
        show: bool = typer.Option(False, "--show", help="Print each configuration as a table."),
    ) -> None:
        """Verify, fingerprint, plan and preprocess a dataset (rerunning skips what is done and valid)."""
        from medseg3d.errors import InputError
        from medseg3d.plans import Plans

        if output is None:
            if not show:
                raise InputError("give the output folder: `medseg3d plan DATA_DIR -o WORK_DIR` "
                                 "(or `medseg3d plan --show WORK_DIR` to print an existing plan)")
            show_plans(Plans.load(folder))
            return
        if gpu_memory is not None and gpu_memory <= 0:
            raise InputError(f"--gpu-memory must be a positive number of GB, got {gpu_memory}")
        budget_s = None
        if time_budget is not None:
            from medseg3d.plans.budget import parse_duration

            budget_s = parse_duration(time_budget)
        wanted = [c.strip() for c in configs.split(",") if c.strip()] or None
        options = None
        if arch != "unet" or arch_option:  # the registry imports torch (1-2 s); the default needs no check
            from medseg3d.networks import get_architecture, parse_option_args

            options = get_architecture(arch).resolve_options(parse_option_args(arch_option))
        from medseg3d.preprocess.run import plan_and_preprocess

        plans, report = plan_and_preprocess(
            folder, output, gpu_memory_gb=gpu_memory, configs=wanted,
            workers=workers or min(8, os.cpu_count() or 1), arch=arch.lower(), arch_options=options,
            time_budget_s=budget_s,
        )
        for ident, n in report.written.items():
            console.print(f"{ident}: {n} case(s) preprocessed, {report.skipped[ident]} already done; "
                          f"{report.footprint_bytes[ident] / 1e6:.1f} MB in {output / 'preprocessed' / ident}")
        console.print(f"plans: {output / 'plans.json'} ({', '.join(plans.configurations)})")
        if show:
            show_plans(plans)
        elif budget_s is not None:
            for n, c in plans.configurations.items():
                if c.time_budget:
                    console.print(f"{n} time budget: {c.time_budget['reason']}")
