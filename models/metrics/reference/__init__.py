"""The reference pneumonia classifier: the feature space of domain FID / PRDC and the judge of label fidelity.

An Inception network trained on ImageNet knows nothing of chest X-rays, so FID in its feature space says
little about whether synthetic radiographs look like real ones. This package trains a small timm CNN
(``in_chans=1``, never hub weights) on *real* images only (an ImageFolder ``NORMAL/``, ``PNEUMONIA/``),
with a patient-level stratified validation split, a class-balanced loss and light augmentations, and
ships it as fp16 safetensors + ``config.json`` + a model card. At run time
:func:`load_reference_classifier` gives :class:`ReferenceClassifier` with ``features`` (the pooled
penultimate embedding) and ``predict_proba`` (pneumonia probability).

Modules: :mod:`~models.metrics.reference.classifier` (config, backbone, inference, save / load),
:mod:`~models.metrics.reference.recipe` (training), :mod:`~models.metrics.reference.card` (model card),
:mod:`~models.metrics.reference.cli` (the command line below).

Train the shipped one (CPU, in the background)::

    python -m models.metrics.reference --data ../shared/data/kermany-pneumonia \
        --out models/weights/reference-classifier-64 --model resnet10t --resolution 64 --epochs 6
"""

from models.metrics.reference.card import write_model_card
from models.metrics.reference.classifier import (
    CARD_FILE,
    CONFIG_FILE,
    FORMAT_VERSION,
    POSITIVE_LABEL,
    SHIPPED_DIR,
    WEIGHTS_FILE,
    ReferenceClassifier,
    ReferenceConfig,
    build_backbone,
    load_reference_classifier,
    save_reference_classifier,
)
from models.metrics.reference.cli import main
from models.metrics.reference.recipe import DATA_SOURCES, train_reference_classifier

__all__ = [
    "CARD_FILE",
    "CONFIG_FILE",
    "DATA_SOURCES",
    "FORMAT_VERSION",
    "POSITIVE_LABEL",
    "SHIPPED_DIR",
    "WEIGHTS_FILE",
    "ReferenceClassifier",
    "ReferenceConfig",
    "build_backbone",
    "load_reference_classifier",
    "main",
    "save_reference_classifier",
    "train_reference_classifier",
    "write_model_card",
]
