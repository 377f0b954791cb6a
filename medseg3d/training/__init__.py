"""medseg3d.training: `train_fold` (the loop of one fold), `TrainConfig` (what the user chose)."""

from medseg3d.training.config import TrainConfig
from medseg3d.training.trainer import fold_dir_of, train_fold

__all__ = ["TrainConfig", "fold_dir_of", "train_fold"]
