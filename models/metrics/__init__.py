"""Generator quality in a chest-X-ray feature space: domain FID, PRDC, diversity, label fidelity, report.

Everything is measured with the shipped *reference classifier* (``models/weights/reference-classifier-64``,
trained on real images only) instead of ImageNet Inception, and reported beside a real-vs-real yardstick.
A plain library: arrays in, numbers and files out; never imports ``app`` or ``worker``.
"""

from models.metrics.diversity import diversity_by_label, mean_pairwise_ms_ssim, ms_ssim_pairs, ms_ssim_settings
from models.metrics.fid import domain_fid, frechet_distance
from models.metrics.fidelity import label_fidelity, label_fidelity_from_proba
from models.metrics.prdc import precision_recall_density_coverage
from models.metrics.reference import (
    ReferenceClassifier,
    ReferenceConfig,
    load_reference_classifier,
    train_reference_classifier,
)
from models.metrics.report import Sampler, generator_report, report_for_samples, write_sample_grid

__all__ = [
    "ReferenceClassifier",
    "ReferenceConfig",
    "Sampler",
    "diversity_by_label",
    "domain_fid",
    "frechet_distance",
    "generator_report",
    "label_fidelity",
    "label_fidelity_from_proba",
    "load_reference_classifier",
    "mean_pairwise_ms_ssim",
    "ms_ssim_pairs",
    "ms_ssim_settings",
    "precision_recall_density_coverage",
    "report_for_samples",
    "train_reference_classifier",
    "write_sample_grid",
]
