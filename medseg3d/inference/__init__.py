"""Inference: checkpoints, sliding-window prediction, one case back to its geometry, folders of cases."""

from medseg3d.inference.checkpoint import (
    FORMAT_VERSION,
    build_model_from_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from medseg3d.inference.predictor import predict_case
from medseg3d.inference.sliding_window import gaussian_importance_map, sliding_window_predict, window_starts

__all__ = [
    "FORMAT_VERSION", "build_model_from_checkpoint", "gaussian_importance_map", "load_checkpoint",
    "predict_case", "predict_folder", "save_checkpoint", "sliding_window_predict", "window_starts",
]


def __getattr__(name: str):  # predict_folder pulls in io + rich; import it on first use
    if name in ("predict_folder", "PredictSummary", "PredictionError"):
        from medseg3d.inference import folder

        return getattr(folder, name)
    raise AttributeError(name)
