"""Downstream evaluation of encoders: pneumonia classification, lung segmentation, bootstrap CIs."""

from models.evaluation.bootstrap import Estimate, bootstrap_ci, bootstrap_indices, bootstrap_mean, percentile_interval
from models.evaluation.classification import (
    ClassificationConfig,
    EvalMode,
    binary_labels,
    evaluate_classification,
    write_report,
)
from models.evaluation.encoders import SCRATCH, EvalEncoder, extract_features, resolve_encoder
from models.evaluation.metrics import (
    CLASSIFICATION_METRICS,
    SEGMENTATION_METRICS,
    auc_rows,
    choose_threshold,
    classification_metrics,
    classification_metrics_with_ci,
    segmentation_metrics,
    summarise_per_image,
)
from models.evaluation.segmentation import (
    MaskPair,
    SegmentationConfig,
    build_segmentation_model,
    evaluate_segmentation,
    list_mask_pairs,
)
from models.evaluation.splits import TrainValSplit, stratified_subsample, validation_split

__all__ = [
    "CLASSIFICATION_METRICS",
    "SCRATCH",
    "SEGMENTATION_METRICS",
    "ClassificationConfig",
    "Estimate",
    "EvalEncoder",
    "EvalMode",
    "MaskPair",
    "SegmentationConfig",
    "TrainValSplit",
    "auc_rows",
    "binary_labels",
    "bootstrap_ci",
    "bootstrap_indices",
    "bootstrap_mean",
    "build_segmentation_model",
    "choose_threshold",
    "classification_metrics",
    "classification_metrics_with_ci",
    "evaluate_classification",
    "evaluate_segmentation",
    "extract_features",
    "list_mask_pairs",
    "percentile_interval",
    "resolve_encoder",
    "segmentation_metrics",
    "stratified_subsample",
    "summarise_per_image",
    "validation_split",
    "write_report",
]
