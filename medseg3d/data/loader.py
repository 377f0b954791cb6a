"""Training batches: an endless stream of sampled + augmented batches, built in worker processes.

`BatchStream` is a torch `IterableDataset` that yields whole batches
`(image (B, C, *patch) float32, label (B, 1, *patch) int64)`; `make_loader` wraps it in a
`DataLoader(batch_size=None, persistent_workers=True)`, so the workers live for the whole run, and
an exception in a worker reaches the trainer with its traceback (`next_batch` turns it into a
MedsegError naming the worker failure). Each (seed, rank, worker) has its own random stream.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from medseg3d.data.augment import AugmentParams, augment_batch
from medseg3d.data.sampling import num_forced_fg, sample_patch
from medseg3d.errors import MedsegError

log = logging.getLogger(__name__)


@dataclass
class StreamSpec:
    """What a batch stream samples: cases of the cache, patch (2 or 3 ints), batch size, augmentation."""

    work_dir: Path
    data_identifier: str
    cases: list[str]
    patch_size: tuple[int, ...]
    batch_size: int
    slice_axis: int | None = None
    oversample_fg: float = 0.33
    augment: AugmentParams | None = None
    seed: int = 0
    previous_dir: Path | None = None  # cascade: the previous stage's segmentations (`medseg3d.cascade`)
    num_classes: int = 0              # K; with `previous_dir` the batch gets K - 1 one-hot channels more


def enlarged_patch(patch_size: Sequence[int], params: AugmentParams | None) -> tuple[int, ...]:
    """Box sampled before the spatial transform: 12.5% margin per side (same parity) when rotating/scaling.

    The margin gives rotated/zoomed-out patches real image instead of zeros at their corners; a
    dummy-2D axis (`AugmentParams.dummy_2d_axis`) is neither rotated nor scaled, so it gets none.
    """
    if params is None or not params.spatial:
        return tuple(int(p) for p in patch_size)
    flat = params.dummy_2d_axis if len(patch_size) == 3 else None
    return tuple(int(p) + (0 if a == flat else 2 * int(math.ceil(0.125 * int(p)))) for a, p in enumerate(patch_size))


class BatchStream(IterableDataset):
    """Endless batches from the preprocessed cache (see module docstring)."""

    def __init__(self, spec: StreamSpec) -> None:
        super().__init__()
        self.spec = spec
        self._cache: dict[str, tuple[np.ndarray, np.ndarray, dict[str, Any]]] = {}
        self._previous: dict[str, np.ndarray] = {}

    def _case(self, name: str) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        if name not in self._cache:
            from medseg3d.preprocess.cache import load_case

            data, seg, props = load_case(self.spec.work_dir, self.spec.data_identifier, name, mmap=True)
            if seg is None:
                raise MedsegError(f"case {name} has no label in the preprocessed cache "
                                  f"({self.spec.work_dir / 'preprocessed' / self.spec.data_identifier}); "
                                  "rerun `medseg3d plan` on a dataset with labelsTr")
            self._cache[name] = (data, seg, props)
        return self._cache[name]

    def _previous_stage(self, name: str) -> np.ndarray | None:
        d = self.spec.previous_dir
        if d is None:
            return None
        if name not in self._previous:
            path = Path(d) / f"{name}.npy"
            if not path.is_file():
                raise MedsegError(f"case {name} has no previous-stage segmentation {path}; rerun `medseg3d train` "
                                  "for the cascade (it rebuilds them)")
            self._previous[name] = np.load(path, mmap_mode="r")
        return self._previous[name]

    def batch(self, rng: np.random.Generator, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch: B cases drawn with replacement, the last `num_forced_fg` centred on foreground."""
        s = self.spec
        box = enlarged_patch(s.patch_size, s.augment)
        n_fg = num_forced_fg(s.batch_size, s.oversample_fg)
        imgs, labs = [], []
        for i in range(s.batch_size):
            name = s.cases[int(rng.integers(len(s.cases)))]
            data, seg, props = self._case(name)
            img, lab = sample_patch(data, seg, props, box, rng, force_fg=i >= s.batch_size - n_fg,
                                    slice_axis=s.slice_axis, extra=self._previous_stage(name))
            imgs.append(img)
            labs.append(lab)
        image = torch.from_numpy(np.stack(imgs))
        label = np.stack(labs)
        label = torch.from_numpy((label if s.previous_dir is not None else label[:, None]).astype(np.int64))
        if s.augment is not None:  # the previous stage rides along as a label channel (nearest, flipped alike)
            image, label = augment_batch(image, label, tuple(s.patch_size), s.augment, gen)
        if s.previous_dir is not None:
            from medseg3d.cascade import cascade_augment, one_hot_foreground

            prev = one_hot_foreground(label[:, 1], s.num_classes)
            if s.augment is not None:
                prev = cascade_augment(prev, rng)
            image, label = torch.cat((image, prev), dim=1), label[:, :1].contiguous()
        return image, label

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        worker = 0 if info is None else info.id
        seed = int(np.random.SeedSequence([self.spec.seed, worker]).generate_state(1)[0])
        rng = np.random.default_rng(seed)
        gen = torch.Generator().manual_seed(seed)
        while True:
            yield self.batch(rng, gen)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # each worker is one core; the trainer owns the others


def make_loader(spec: StreamSpec, num_workers: int, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over `BatchStream(spec)` with persistent workers (none: batches built in-process)."""
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs = dict(persistent_workers=True, prefetch_factor=2, worker_init_fn=_worker_init)
    return DataLoader(BatchStream(spec), batch_size=None, num_workers=num_workers, pin_memory=pin_memory, **kwargs)


def next_batch(it: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """`next(it)`, with a worker's failure turned into a MedsegError that keeps its cause."""
    try:
        return next(it)
    except MedsegError:
        raise
    except Exception as exc:  # a worker crash or an error inside one: report, never hang
        raise MedsegError(f"data loading failed ({type(exc).__name__}): {exc}. Check the preprocessed cache "
                          "(rerun `medseg3d plan` to repair it) or train with --num-workers 0 to debug") from exc
