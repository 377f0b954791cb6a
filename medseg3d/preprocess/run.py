"""Preprocess a whole dataset into the cache: parallel, resumable, atomic, with the disk footprint.

A case whose files already exist and agree with its properties is skipped, so an interrupted run
continues where it stopped. Each data identifier is written once (3d_fullres and
3d_cascade_fullres share one; 2d has its own, the slice axis at each case's native spacing).
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


# ---- the whole `medseg3d plan` stage ------------------------------------------------------------

PREPROCESS_KEYS = ("spacing", "normalization", "resampling", "data_identifier")


def _cache_key(plans: Plans, cfg: ConfigurationPlan) -> dict[str, Any]:
    return {"dataset_hash": plans.dataset_hash, **{k: cfg.raw[k] for k in PREPROCESS_KEYS}}


def _invalidate_stale_caches(plans: Plans, work_dir: Path, names: list[str]) -> None:
    """Empty a cache folder written for other preprocessing settings, then record the current ones."""
    import json
    import shutil

    from medseg3d.io.atomic import write_json_atomic
    from medseg3d.preprocess.cache import cache_dir

    for n in names:
        cfg = plans.configuration(n)
        d = cache_dir(work_dir, cfg.data_identifier)
        key_file = d / ".cache_key.json"
        key = _cache_key(plans, cfg)
        if d.is_dir():
            try:
                old = json.loads(key_file.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                old = None
            if old != key:
                log.info("%s: preprocessing settings changed, the old cache is removed", cfg.data_identifier)
                shutil.rmtree(d)
        write_json_atomic(key_file, key)


def files_signature(cases: list[Case]) -> str:
    """sha256 of every case's file names, sizes and modification times (cheap change detection)."""
    import hashlib

    h = hashlib.sha256()
    for c in sorted(cases, key=lambda c: c.name):
        for p in [*c.images, *([c.label] if c.label else [])]:
            st = Path(p).stat()
            h.update(f"{c.name}|{Path(p).name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def merge_plans(old: Plans, new: Plans) -> Plans:
    """`new`, plus the configurations of `old` that `new` does not plan, when both describe the same data.

    So `medseg3d plan --configs 2d` on a WORK_DIR adds 2d and keeps 3d_fullres (and its trained
    folds). A configuration planned again replaces the old one; when that changes what a network
    depends on, the log says so (its checkpoints are then refused, naming the difference). Data that
    changed (another dataset hash) replaces the whole plan.
    """
    from medseg3d.plans.planner import ALL_CONFIGS
    from medseg3d.plans.schema import identity_differences

    if old.dataset_hash != new.dataset_hash:
        if old.configurations:
            log.warning("the dataset changed since the existing plan: every configuration is planned anew "
                        "(%s); folds trained before will be refused", ", ".join(old.configurations))
        return new
    for name in set(old.configurations) & set(new.configurations):
        diffs = identity_differences(old.network_identity(name), new.network_identity(name))
        if diffs:
            log.warning("%s re-planned with other network settings (%s): folds trained with the old plan "
                        "will be refused", name, "; ".join(diffs))
    raw = new.to_dict()
    for name, cfg in raw["configurations"].items():  # architectures planned before stay planned
        before = old.raw["configurations"].get(name, {}).get("architectures") or {}
        if before:
            cfg["architectures"] = {**before, **(cfg.get("architectures") or {})}
    merged = {**old.raw["configurations"], **raw["configurations"]}
    raw["configurations"] = {k: merged[k] for k in ALL_CONFIGS if k in merged}
    kept = [k for k in old.configurations if k not in new.configurations]
    if kept:
        log.info("kept from the existing plan: %s", ", ".join(kept))
    return Plans(raw)


def plan_and_preprocess(
    data_dir: str | Path,
    work_dir: str | Path,
    *,
    gpu_memory_gb: float | None = None,
    configs: list[str] | None = None,
    workers: int = 1,
    arch: str = "unet",
    arch_options: dict[str, Any] | None = None,
    time_budget_s: float | None = None,
    budget_device: str = "auto",
) -> tuple[Plans, PreprocessReport]:
    """`medseg3d plan`: verify, fingerprint, plan, preprocess. Each step reuses valid earlier output.

    Writes `WORK_DIR/dataset_fingerprint.json`, `WORK_DIR/plans.json`,
    `WORK_DIR/preprocessed/<data_identifier>/`. Returns the plans and the preprocessing report.
    `time_budget_s` (`plan --time-budget`): seconds of one fold's training + final validation; each
    planned configuration then gets a `time_budget` entry (`medseg3d.plans.timing`), timed on
    `budget_device`. Without it the plan is nnU-Net's.
    """
    import json
    import time

    from medseg3d.fingerprint import compute_fingerprint, save_fingerprint
    from medseg3d.io import verify_dataset
    from medseg3d.plans.memory import cuda_available, default_budget_gb
    from medseg3d.plans.planner import plan_from_fingerprint

    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    summary = verify_dataset(data_dir, workers=workers)
    spec = summary.spec
    cases = [c for c in spec.cases if c.label is not None]
    t1 = time.perf_counter()

    fp_path = work_dir / "dataset_fingerprint.json"
    signature = files_signature(cases)
    fingerprint = None
    if fp_path.is_file():
        try:
            old = json.loads(fp_path.read_text(encoding="utf-8"))
            fingerprint = old if old.get("files_signature") == signature else None
        except (OSError, ValueError):
            fingerprint = None
    if fingerprint is None:
        fingerprint = compute_fingerprint(spec, workers=workers)
        fingerprint["files_signature"] = signature
        save_fingerprint(fingerprint, fp_path)
    else:
        log.info("fingerprint up to date, reused: %s", fp_path)
    t2 = time.perf_counter()

    measure = cuda_available()
    budget = gpu_memory_gb if gpu_memory_gb is not None else default_budget_gb()
    fp_for_plan = {k: v for k, v in fingerprint.items() if k != "files_signature"}
    plans = plan_from_fingerprint(
        fp_for_plan, gpu_memory_gb=budget, configs=configs, arch=arch, arch_options=arch_options,
        dataset_dir=str(Path(data_dir).resolve()), measure_cuda=measure,
    )
    plans_path = work_dir / "plans.json"
    old = None
    if plans_path.is_file():
        try:
            old = Plans.load(plans_path)
        except MedsegError as exc:
            log.warning("the existing %s is not usable (%s); it is replaced", plans_path, exc)
    if time_budget_s is not None:
        from medseg3d.plans.timing import add_time_budgets

        plans = add_time_budgets(plans, time_budget_s, len(cases), old, budget_device)
    if old is not None:
        plans = merge_plans(old, plans)
    if old is None or old.to_dict() != plans.to_dict():
        plans.save(plans_path)
    t3 = time.perf_counter()
    names = list(plans.configurations)
    _invalidate_stale_caches(plans, work_dir, names)
    report = preprocess_dataset(cases, plans, work_dir, names, workers)
    t4 = time.perf_counter()
    log.info("verify %.1f s, fingerprint %.1f s, plan %.1f s, preprocess %.1f s; cache %.1f MB",
             t1 - t0, t2 - t1, t3 - t2, t4 - t3, report.total_bytes / 1e6)
    return plans, report
