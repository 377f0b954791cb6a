"""Preprocess a whole dataset into the cache: parallel, resumable, atomic, with the disk footprint.

A case whose files already exist and agree with its properties is skipped, so an interrupted run
continues where it stopped. 2d shares 3d_fullres' cache (same data_identifier): each identifier is
written once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medseg3d.errors import InputError, MedsegError
from medseg3d.fingerprint import parallel_map
from medseg3d.io import Case, read_label, read_volume
from medseg3d.plans.schema import ConfigurationPlan, Plans
from medseg3d.preprocess.cache import disk_footprint, is_cached, save_case
from medseg3d.preprocess.pipeline import preprocess_case

log = logging.getLogger(__name__)


@dataclass
class PreprocessReport:
    """What one run did: cases written and skipped per data identifier, bytes on disk."""

    written: dict[str, int]
    skipped: dict[str, int]
    footprint_bytes: dict[str, int]

    @property
    def total_bytes(self) -> int:
        return sum(self.footprint_bytes.values())


class _Job:
    """Picklable per-case work for the process pool."""

    def __init__(self, work_dir: Path, config: ConfigurationPlan, classes: list[int]) -> None:
        self.work_dir, self.config, self.classes = work_dir, config, classes

    def __call__(self, case: Case) -> str:
        try:
            image = read_volume(case.images)
            label = read_label(case.label) if case.label is not None else None
            pc = preprocess_case(image, self.config, label, self.classes)
        except MedsegError as exc:
            raise InputError(f"case {case.name}: preprocessing failed: {exc}") from exc
        save_case(self.work_dir, self.config.data_identifier, case.name, pc.data, pc.seg, pc.properties)
        return case.name


def preprocess_dataset(
    cases: list[Case], plans: Plans, work_dir: str | Path, configs: list[str] | None = None, workers: int = 1
) -> PreprocessReport:
    """Write every case of `cases` for each configuration in `configs` (default: all planned)."""
    work_dir = Path(work_dir)
    names = configs or list(plans.configurations)
    by_identifier: dict[str, ConfigurationPlan] = {}
    for n in names:
        cfg = plans.configuration(n)
        by_identifier.setdefault(cfg.data_identifier, cfg)
    classes = [c for c in sorted(plans.labels) if c > 0]
    written: dict[str, int] = {}
    skipped: dict[str, int] = {}
    footprint: dict[str, int] = {}
    for ident, cfg in by_identifier.items():
        todo = [c for c in cases if not is_cached(work_dir, ident, c.name, with_seg=c.label is not None)]
        skipped[ident] = len(cases) - len(todo)
        if skipped[ident]:
            log.info("%s: %d case(s) already preprocessed, skipped", ident, skipped[ident])
        parallel_map(_Job(work_dir, cfg, classes), todo, workers, f"preprocess {ident}")
        written[ident] = len(todo)
        footprint[ident] = disk_footprint(work_dir, ident)
        log.info("%s: %d case(s) written, %.1f MB on disk", ident, len(todo), footprint[ident] / 1e6)
    return PreprocessReport(written, skipped, footprint)


def describe(report: PreprocessReport) -> dict[str, Any]:
    """JSON-able summary of a report."""
    return {"written": report.written, "skipped": report.skipped, "footprint_bytes": report.footprint_bytes,
            "total_bytes": report.total_bytes}
