"""Per-epoch metrics of a fold: `metrics.csv` and `progress.png`, rebuilt from a history list.

The history (one dict per epoch) travels in the checkpoint (`log`), so `--resume` restores the
curves and the CSV exactly; both files are rewritten atomically each epoch.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any

from medseg3d.io.atomic import atomic_path, write_bytes_atomic

log = logging.getLogger(__name__)

BASE_COLUMNS = ["epoch", "train_loss", "val_loss", "mean_pseudo_dice", "ema_pseudo_dice", "lr", "epoch_time_s",
                "data_wait_fraction", "iterations_per_s"]


def columns(history: list[dict[str, Any]]) -> list[str]:
    """CSV header: the base columns then `pseudo_dice_<label>` per class, in first-seen order."""
    extra: list[str] = []
    for row in history:
        for k in row:
            if k not in BASE_COLUMNS and k not in extra:
                extra.append(k)
    return BASE_COLUMNS + extra


def write_metrics_csv(history: list[dict[str, Any]], path: Path) -> None:
    """All epochs of `history` as CSV (floats with 6 significant digits), atomically."""
    buf = io.StringIO()
    cols = columns(history)
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for row in history:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    write_bytes_atomic(Path(path), buf.getvalue().encode("utf-8"))


def plot_progress(history: list[dict[str, Any]], path: Path) -> None:
    """`progress.png`: losses and pseudo-Dice (raw, EMA) per epoch; lr; epoch time and data wait."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return
    ep = [r["epoch"] for r in history]
    fig, axes = plt.subplots(3, 1, figsize=(10, 11), sharex=True)
    ax = axes[0]
    ax.plot(ep, [r["train_loss"] for r in history], "b-", label="train loss")
    if any(r.get("val_loss") is not None for r in history):
        ax.plot(ep, [r.get("val_loss") for r in history], "r-", label="val loss")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    dice_cols = [c for c in columns(history) if c.startswith("pseudo_dice_")]
    for c in dice_cols:
        ax2.plot(ep, [r.get(c) for r in history], ":", label=c)
    if any(r.get("ema_pseudo_dice") is not None for r in history):
        ax2.plot(ep, [r.get("ema_pseudo_dice") for r in history], "g-", label="EMA pseudo-Dice")
    ax2.set_ylabel("pseudo-Dice")
    ax2.set_ylim(0, 1)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="best", fontsize=8)
    axes[1].plot(ep, [r["lr"] for r in history], "k-")
    axes[1].set_ylabel("learning rate")
    axes[2].plot(ep, [r["epoch_time_s"] for r in history], "b-", label="epoch time (s)")
    axes[2].set_ylabel("epoch time (s)")
    ax3 = axes[2].twinx()
    ax3.plot(ep, [r["data_wait_fraction"] for r in history], "r--", label="data-wait fraction")
    ax3.set_ylabel("data-wait fraction")
    ax3.set_ylim(0, 1)
    axes[2].set_xlabel("epoch")
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)


def write_epoch_artifacts(history: list[dict[str, Any]], fold_dir: Path) -> None:
    """metrics.csv and progress.png of `fold_dir` from `history`."""
    write_metrics_csv(history, fold_dir / "metrics.csv")
    try:
        plot_progress(history, fold_dir / "progress.png")
    except Exception as exc:  # a plotting failure must never stop training
        log.warning("could not draw progress.png (%s)", exc)
