"""The interface every SSL method implements, so one training loop serves DINO and SimCLR."""

from __future__ import annotations

import torch
from torch import nn

from models.ssl.augment import MultiViewAugment


class SSLModel(nn.Module):
    """A self-supervised model: its views, its loss, its hooks around the optimiser step, its encoder.

    ``views`` is the batched on-device augmentation; ``training_loss`` takes the list of ``[0, 1]``
    views already normalised; ``encoder`` is the backbone that gets exported.
    """

    method: str = ""

    def views(self) -> MultiViewAugment:
        """The augmentation producing this method's views of a batch."""
        raise NotImplementedError

    def training_loss(self, views: list[torch.Tensor], step: int, total_steps: int) -> torch.Tensor:
        """Loss of one batch of views at ``step`` (schedules such as the teacher temperature use it)."""
        raise NotImplementedError

    def forward(self, views: list[torch.Tensor], step: int, total_steps: int) -> torch.Tensor:
        """The training loss: ``forward`` so that ``DistributedDataParallel`` can wrap the model."""
        return self.training_loss(views, step, total_steps)

    def before_optimizer_step(self, step: int, total_steps: int) -> None:
        """Called after ``backward`` and before ``optimizer.step`` (e.g. to freeze a layer's gradient)."""

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """Called after ``optimizer.step`` (e.g. the teacher's EMA update)."""

    def encoder(self) -> nn.Module:
        """The backbone to export (the teacher for DINO, the only backbone for SimCLR)."""
        raise NotImplementedError

    def trainable_modules(self) -> nn.Module:
        """The part of the model the optimiser updates (the student for DINO)."""
        return self
