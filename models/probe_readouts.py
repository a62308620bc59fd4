"""The registry of linear-probe readouts: how frozen features are read from an encoder.

One list, read by :class:`models.evaluation.ClassificationConfig` (``linear_readouts``), ``cxrsynth
evaluate classification --readout`` and ``benchmarks/frozen_probe.py``. Light (no torch), like
:mod:`models.ssl_methods`, so the CLI lists the names without loading the ML stack. An unknown name fails
loudly.

"avg" is the paper table's linear protocol: the model's own global pool at the evaluation resolution.
The others exist because a ResNet pretrained at 64 px and pooled globally keeps no layout (where an
opacity sits) while logistic regression on 32x32 pixels keeps all of it; ``docs/results/frozen_probe.md``
measures them, each chosen on validation AUC together with the probe's ``C``.
"""

from __future__ import annotations

from typing import NamedTuple


class Readout(NamedTuple):
    """The input side as a multiple of the evaluation resolution, and the side of the average-pooled grid
    of the last feature map (1: the model's own pool)."""

    scale: int
    grid: int


LINEAR_READOUTS: dict[str, Readout] = {
    "avg": Readout(1, 1),
    "grid2": Readout(1, 2),  # the last map average-pooled to 2x2 (4x the features)
    "avg@2x": Readout(2, 1),  # images at twice the resolution (a convolutional encoder takes any size)
    "grid2@2x": Readout(2, 2),
}
DEFAULT_READOUT = "avg"


def linear_readout(name: str) -> Readout:
    """The registered readout ``name``; ``ValueError`` naming the known ones otherwise."""
    if name not in LINEAR_READOUTS:
        raise ValueError(f"unknown linear-probe readout {name!r}: choose from {', '.join(LINEAR_READOUTS)}")
    return LINEAR_READOUTS[name]
