"""Memorisation (privacy) gate: nearest training images of generated ones, calibrated on real data.

``models.privacy`` is a plain library (arrays and folders in, numbers and files out). Modules:
:mod:`~models.privacy.search` (exact batched nearest-neighbour search), :mod:`~models.privacy.scoring`
(pixel and embedding similarity), :mod:`~models.privacy.embedding` (the networks),
:mod:`~models.privacy.index` (privacy index + calibration of a generator), :mod:`~models.privacy.gate`
(the gate), :mod:`~models.privacy.report` (privacy report JSON + PNG) and
:mod:`~models.privacy.planting` (planted copies for tests and benchmarks).
"""

from models.privacy.gate import GateResult, MemorisationGate
from models.privacy.index import (
    DEFAULT_QUANTILE,
    PRIVACY_CALIBRATION,
    PRIVACY_INDEX,
    PrivacyCalibration,
    PrivacyIndex,
    PrivacyIndexMissing,
    build_for_generator,
    build_privacy_index,
    has_privacy_index,
    load_privacy_index,
    save_privacy_index,
)

__all__ = [
    "DEFAULT_QUANTILE",
    "PRIVACY_CALIBRATION",
    "PRIVACY_INDEX",
    "GateResult",
    "MemorisationGate",
    "PrivacyCalibration",
    "PrivacyIndex",
    "PrivacyIndexMissing",
    "build_for_generator",
    "build_privacy_index",
    "has_privacy_index",
    "load_privacy_index",
    "save_privacy_index",
]
