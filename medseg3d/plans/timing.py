"""Measuring for `medseg3d plan --time-budget`: real training steps of candidate widths on this device.

For each width of `budget.WIDTH_DIVISORS` (narrowest first) the plan's network is built with
`medseg3d.networks.build_network`, and one warm-up then `STEPS` timed forward + backward + AdamW
steps (deep-supervised Dice + CE, gradient clipping, the precision and memory format training would
use) run on random data of the plan's patch and batch; the median is its seconds per iteration.
A forward pass of the batch without gradients is timed the same way (validation batches and the
final validation's sliding windows). Seconds per candidate, not minutes. A wider width is not timed
when, even at the narrower one's speed, the budget could not give it the fewest iterations any
option needs (a wider network is never faster). The timings are stored in the plan with the device
they were measured on and reused by a later `plan --time-budget` on the same device, so re-planning
gives the same choice. On a CPU the share of its threads' time the timing process got is stored too:
timings taken while other work held the cores (`CONTENDED_SHARE`) are warned about and timed again
by the next plan rather than reused.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

from medseg3d.plans import budget as bud
from medseg3d.plans.schema import Plans

log = logging.getLogger(__name__)

#: Timed steps per candidate after one warm-up step (the median is kept).
STEPS = 3
#: Below this CPU share (`time_width`) the CPU was contended while timing: warned, and not reused later.
CONTENDED_SHARE = 0.75


def device_description(device: Any) -> str:
    """A name of the device the timings belong to: the GPU's name, or the CPU model and torch threads."""
    import torch

    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if not model:
        import platform

        model = platform.processor() or platform.machine()
    return f"cpu: {model}, {torch.get_num_threads()} torch threads"


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_width(arch: str, network_kwargs: dict[str, Any], batch: int, in_channels: int, num_classes: int,
               device: Any, amp_dtype: Any, channels_last: bool, steps: int = STEPS) -> tuple[float, float]:
    """(seconds per training iteration, seconds per no-grad forward of the batch, CPU share) of one network.

    network_kwargs: `build_network`'s dims, strides, kernel_sizes, features, patch_size, options.
    Each time is the median of `steps` timed runs after one warm-up, on random data `(batch, C, *patch)`.
    CPU share (CPU only, else None): the process's CPU seconds over wall seconds x torch threads during
    the timed runs, about 1 on a quiet machine; lower when other work took the cores (the times are
    then slow).
    """
    import torch

    from medseg3d.losses import DeepSupervisionLoss, DiceCELoss
    from medseg3d.networks import build_network

    patch = [int(p) for p in network_kwargs["patch_size"]]
    net = build_network(arch, in_channels=in_channels, num_classes=num_classes, deep_supervision=True,
                        **network_kwargs).to(device).train()
    fmt = torch.channels_last_3d if len(patch) == 3 else torch.channels_last
    if channels_last:
        net = net.to(memory_format=fmt)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    loss_fn = DeepSupervisionLoss(DiceCELoss(), weights=net.output_weights)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, in_channels, *patch, generator=gen).to(device)
    if channels_last:
        x = x.contiguous(memory_format=fmt)
    y = torch.randint(0, num_classes, (batch, 1, *patch), generator=gen).to(device)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype is not None else \
        (lambda: torch.autocast(device.type, enabled=False))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast():
            out = net(x)
        loss = loss_fn(out, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 12.0)
        opt.step()

    @torch.no_grad()
    def forward() -> None:
        with autocast():
            net(x)

    used = [0.0, 0.0]  # process CPU seconds, wall seconds of the timed calls

    def timed(fn: Any) -> float:
        times = []
        for i in range(steps + 1):
            _sync(device)
            t, c = time.perf_counter(), time.process_time()
            fn()
            _sync(device)
            if i:  # the first call is the warm-up (kernel selection, allocator)
                times.append(time.perf_counter() - t)
                used[0] += time.process_time() - c
                used[1] += times[-1]
        return float(statistics.median(times))

    s_it, s_fwd = timed(step), timed(forward)
    share = None
    if device.type == "cpu" and used[1] > 0:
        threads = max(1, min(torch.get_num_threads(), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                             else (os.cpu_count() or 1)))
        share = min(1.0, used[0] / (used[1] * threads))
    return s_it, s_fwd, share


def budget_facts(view: Any, n_cases: int) -> bud.BudgetFacts:
    """The facts `choose_budget_plan` needs for configuration view `view` of a dataset of `n_cases`."""
    from medseg3d.inference.sliding_window import mirror_variants, window_starts

    patch = list(view.patch_size)
    axes = view.in_plane_axes
    shape = [max(int(view.median_shape[a]), p) for a, p in zip(axes, patch)]
    windows = math.prod(len(s) for s in window_starts(shape, patch, 0.5))
    if view.slice_axis is not None:  # 2d: every slice of the median image is a window row
        windows *= max(1, int(view.median_shape[view.slice_axis]))
    return bud.BudgetFacts(patch_size=patch, batch_size=int(view.batch_size),
                           validation_cases=max(1, math.ceil(n_cases / bud.FOLDS)),
                           windows_per_case=int(windows), mirror_variants=len(mirror_variants(view.mirror_axes)))


def _runtime_defaults(device: Any, dims: int) -> tuple[Any, bool, str]:
    """(autocast dtype, channels-last, precision name) that `medseg3d train` resolves by default."""
    # training's own defaults, so that the timing is the training's (runtime.py imports only torch)
    from medseg3d.training.config import TrainConfig
    from medseg3d.training.runtime import amp_setup, use_channels_last

    amp_dtype, _ = amp_setup(device, None)
    cl = use_channels_last(TrainConfig(), device, dims, amp_dtype)
    name = "fp32" if amp_dtype is None else str(amp_dtype).replace("torch.", "")
    return amp_dtype, cl, name


def time_budget_entry(plans: Plans, config_name: str, budget_s: float, n_cases: int, device: Any,
                      old_entry: dict[str, Any] | None = None) -> dict[str, Any]:
    """The `time_budget` entry of one configuration: device, measured widths, facts, choice, reason.

    n_cases: labelled cases of the dataset (a fold validates a fifth of them). Widths measured before
    on the same device, precision, memory format, architecture, patch, batch and input channels
    (`old_entry`) are reused rather than timed again.
    """
    view = _plain_view(plans, config_name)
    arch = view.architecture
    from medseg3d.networks import get_architecture

    options = get_architecture(arch).resolve_options(view.architecture_options)
    in_channels = plans.num_channels + (plans.num_classes - 1 if view.previous_stage else 0)
    facts = budget_facts(view, n_cases)
    amp_dtype, channels_last, precision = _runtime_defaults(device, view.dims)
    key = {"device": device.type, "device_name": device_description(device), "precision": precision,
           "channels_last": bool(channels_last), "architecture": arch, "architecture_options": options,
           "in_channels": in_channels}
    cached: dict[tuple[int, ...], bud.WidthTiming] = {}
    if old_entry and all(old_entry.get(k) == v for k, v in key.items()) and \
            old_entry.get("facts", {}).get("patch_size") == facts.patch_size and \
            old_entry.get("facts", {}).get("batch_size") == facts.batch_size:
        cached = {tuple(t["features"]): bud.WidthTiming.from_dict(t) for t in old_entry.get("measured", [])}
    timings: list[bud.WidthTiming] = []
    fastest: float | None = None
    least = min(bud.MIN_ITERATIONS.values())
    for div in sorted(bud.WIDTH_DIVISORS, reverse=True):  # narrowest first
        feats = bud.scaled_features(view.features, div)
        name = bud.width_name(div)
        old = cached.get(tuple(feats))
        if old is not None and old.measured and (old.cpu_share is None or old.cpu_share >= CONTENDED_SHARE):
            timing = bud.WidthTiming(name, feats, old.seconds_per_iteration, old.seconds_per_forward,
                                     cpu_share=old.cpu_share)
            log.info("%s %s width %s: %.3f s per iteration (timed before on %s, reused)", config_name, name,
                     "-".join(map(str, feats)), timing.seconds_per_iteration, key["device_name"])
        elif fastest is not None and budget_s / (fastest * bud.EPOCH_OVERHEAD) < least:
            timing = bud.WidthTiming(name, feats, skipped=f"not timed: even at the narrower width's "
                                     f"{fastest:.3g} s per iteration the budget gives fewer than {least:,}")
        else:
            kwargs = {**view.network_kwargs(), "features": feats, "options": options}
            t0 = time.perf_counter()
            s_it, s_fwd, share = time_width(arch, kwargs, facts.batch_size, in_channels, plans.num_classes, device,
                                            amp_dtype, channels_last)
            timing = bud.WidthTiming(name, feats, round(s_it, 5), round(s_fwd, 5),
                                     cpu_share=None if share is None else round(share, 3))
            if share is not None and share < CONTENDED_SHARE:
                log.warning("%s %s width: the CPU was busy with other work while timing (this process got %.0f%% of "
                            "its threads' time): the timings are slow and the schedule short. `train` re-estimates "
                            "after its first epochs; for a plan that fits, re-plan on a quiet machine (timings "
                            "measured under contention are not reused)", config_name, name, 100 * share)
            log.info("%s %s width %s: %.3f s per iteration, %.3f s per forward (timed in %.1f s on %s)",
                     config_name, name, "-".join(map(str, feats)), s_it, s_fwd, time.perf_counter() - t0,
                     key["device_name"])
        if timing.measured:
            fastest = timing.seconds_per_iteration if fastest is None else min(fastest, timing.seconds_per_iteration)
        timings.append(timing)
    timings.reverse()  # stored widest first
    choice = bud.choose_budget_plan(timings, budget_s, facts)
    return {"rules_version": bud.RULES_VERSION, "budget_s": float(budget_s), **key, "steps_timed": STEPS,
            "measured": [t.to_dict() for t in timings], "facts": facts.to_dict(), "choice": choice.to_dict(),
            "reason": choice.reason}


def _plain_view(plans: Plans, config_name: str) -> Any:
    """The configuration as planned without a time budget (its nnU-Net keys, for the default architecture)."""
    from medseg3d.plans.schema import ConfigurationPlan

    raw = copy.deepcopy(plans.configuration(config_name).raw)
    raw.pop("time_budget", None)
    return ConfigurationPlan(config_name, raw).for_architecture(None)


def add_time_budgets(plans: Plans, budget_s: float, n_cases: int, old: Plans | None = None,
                     device: str = "auto") -> Plans:
    """`plans` with a `time_budget` entry in every configuration (`medseg3d plan --time-budget`).

    budget_s: seconds of one fold's training plus its final validation; n_cases: labelled cases;
    old: the plan already in WORK_DIR, whose timings are reused where they still apply; device: where
    training will run (`auto`: CUDA when torch sees a GPU).
    """
    from medseg3d.device import resolve_device

    dev = resolve_device(device)
    raw = plans.to_dict()
    for name in raw["configurations"]:
        before = None
        if old is not None and name in old.raw["configurations"]:
            before = old.raw["configurations"][name].get("time_budget")
        entry = time_budget_entry(plans, name, budget_s, n_cases, dev, before)
        raw["configurations"][name]["time_budget"] = entry
        log.info("%s time budget: %s", name, entry["reason"])
    return Plans(raw)
