"""cxrsynth.models: the machine-learning library (diffusion, SSL, evaluation, metrics, privacy, release).

A plain library: tensors and folders in, tensors, files and metrics out. It never imports ``app`` or
``worker``; the service calls it through functions that take an ``on_step`` progress callback.
"""

from models.callbacks import Canceled, OnStep, no_progress

__all__ = ["Canceled", "OnStep", "no_progress"]
