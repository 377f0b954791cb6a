"""Evaluation: pure metrics, folder evaluation, cross-validation summary, postprocessing choice."""

from medseg3d.evaluation.evaluate import CasePair, evaluate_folders, evaluate_pairs, match_cases, summarize
from medseg3d.evaluation.metrics import case_metrics, confusion_matrix, hd95, region_metrics

__all__ = [
    "CasePair", "case_metrics", "confusion_matrix", "evaluate_folders", "evaluate_pairs", "hd95", "match_cases",
    "region_metrics", "summarize",
]
