"""Label fidelity ("biomarkers preserved"): does the reference classifier see pneumonia where it was asked for?

Conditional samples are scored by the reference classifier; AUC and accuracy (torchmetrics) compare its
pneumonia probability with the label each sample was generated for. An AUC near the real-data figure
means the generator draws the opacities that define the label; 0.5 means the label is ignored.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from models.metrics.images import ImageBatch, check_images, check_labels


class ProbabilityModel(Protocol):
    """Anything with ``predict_proba(images) -> (N,)`` positive-class probabilities (the reference classifier)."""

    def predict_proba(self, images: ImageBatch, batch_size: int = ...) -> torch.Tensor: ...


def label_fidelity_from_proba(
    probabilities: np.ndarray | torch.Tensor | Sequence[float],
    targets: np.ndarray | torch.Tensor | Sequence[int],
    threshold: float = 0.5,
) -> dict[str, float | int]:
    """AUC, accuracy, balanced accuracy, sensitivity and specificity of probabilities vs 0/1 targets.

    Raises ``ValueError`` for empty or mismatched inputs, probabilities outside [0, 1], targets other
    than 0/1, or a single class (AUC is undefined).
    """
    from torchmetrics.functional.classification import (
        binary_accuracy,
        binary_auroc,
        binary_recall,
        binary_specificity,
    )

    p = torch.as_tensor(probabilities if isinstance(probabilities, torch.Tensor) else np.asarray(probabilities))
    p = p.detach().to("cpu", torch.float64).reshape(-1)
    if p.numel() == 0:
        raise ValueError("probabilities: empty")
    t = torch.from_numpy(check_labels(np.asarray(targets), p.numel(), "targets"))
    if not torch.isfinite(p).all() or float(p.min()) < 0.0 or float(p.max()) > 1.0:
        raise ValueError("probabilities must be finite and lie in [0, 1]")
    if not bool(((t == 0) | (t == 1)).all()):
        raise ValueError("targets must be 0 (negative) or 1 (positive)")
    n_pos = int(t.sum())
    if n_pos == 0 or n_pos == t.numel():
        raise ValueError("label fidelity needs samples of both classes: AUC is undefined for one class only")
    sens = float(binary_recall(p, t, threshold=threshold))
    spec = float(binary_specificity(p, t, threshold=threshold))
    return {
        "auc": round(float(binary_auroc(p, t)), 4),
        "accuracy": round(float(binary_accuracy(p, t, threshold=threshold)), 4),
        "balanced_accuracy": round((sens + spec) / 2.0, 4),
        "sensitivity": round(sens, 4),
        "specificity": round(spec, 4),
        "threshold": threshold,
        "n": int(t.numel()),
        "n_positive": n_pos,
    }


def positive_targets(
    labels: np.ndarray | torch.Tensor | Sequence[int], label_names: Sequence[str], positive_label: str
) -> np.ndarray:
    """Map class indices over ``label_names`` to 0/1 (1 = ``positive_label``, case-insensitive).

    Raises ``ValueError`` unless there are exactly two label names and one of them is the positive label.
    """
    names = [n.lower() for n in label_names]
    if len(names) != 2 or positive_label.lower() not in names:
        raise ValueError(f"label fidelity needs two labels including {positive_label!r}, got {list(label_names)}")
    arr = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    lab = check_labels(arr, int(arr.size))
    if lab.size and (lab.min() < 0 or lab.max() >= len(names)):
        raise ValueError(f"labels must be indices into {list(label_names)}")
    return (lab == names.index(positive_label.lower())).astype(np.int64)


def label_fidelity(
    images: ImageBatch,
    labels: np.ndarray | torch.Tensor | Sequence[int],
    label_names: Sequence[str],
    classifier: ProbabilityModel,
    positive_label: str = "pneumonia",
    threshold: float = 0.5,
    batch_size: int = 256,
) -> dict[str, float | int]:
    """Label fidelity of conditional samples: the classifier's AUC/accuracy against the requested labels."""
    t = check_images(images)
    lab = check_labels(np.asarray(labels), int(t.shape[0]))
    targets = positive_targets(lab, label_names, positive_label)
    return label_fidelity_from_proba(classifier.predict_proba(t, batch_size=batch_size), targets, threshold)
