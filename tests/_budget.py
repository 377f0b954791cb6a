"""Injected timings and Task04-like facts shared by the time-budget tests (made-up seconds, no timing)."""

from __future__ import annotations

from medseg3d.plans import budget as bud

#: Task04-like facts: 42 validation cases, one window each (the patch covers the median image), 3D TTA.
FACTS = bud.BudgetFacts(patch_size=[40, 56, 40], batch_size=7, validation_cases=42, windows_per_case=1,
                        mirror_variants=8)
PLAN_FEATURES = [32, 64, 128, 256]

def widths(s_per_it: dict[str, float | None], forward_ratio: float = 0.25) -> list[bud.WidthTiming]:
    """Injected timings: seconds per iteration per width name (None: not timed), forward = a fraction."""
    out = []
    for div in bud.WIDTH_DIVISORS:
        name = bud.width_name(div)
        s = s_per_it.get(name)
        feats = bud.scaled_features(PLAN_FEATURES, div)
        out.append(bud.WidthTiming(name, feats, s, None if s is None else s * forward_ratio,
                                   None if s is not None else "not timed in this test"))
    return out


# CPU-like: 2-core EPYC at the hippocampus plan, timed steps (orders of magnitude only, made up for the
# rules; the hand-made recipe's 800 iterations in 40 minutes were about 3 s each with the loader; the
# 1/4 width costs 0.6-0.8 of the 1/2 width's step on two of the three measured CPUs, so 1.25 here)
CPU = {"1x": 9.0, "1/2": 2.0, "1/4": 1.25}
# GPU-like
GPU = {"1x": 0.05, "1/2": 0.03, "1/4": 0.02}
