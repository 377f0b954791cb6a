"""medseg3d.data: cross-validation splits, patch sampling, batched augmentation, batch loader."""

from medseg3d.data.augment import AugmentParams, augment_batch, no_augmentation
from medseg3d.data.loader import BatchStream, StreamSpec, make_loader, next_batch
from medseg3d.data.sampling import sample_patch
from medseg3d.data.splits import fold_cases, load_or_create_splits, make_splits

__all__ = ["AugmentParams", "BatchStream", "StreamSpec", "augment_batch", "fold_cases", "load_or_create_splits",
           "make_loader", "make_splits", "next_batch", "no_augmentation", "sample_patch"]
