"""SimCLR (Chen et al. 2020), the second method: contrastive learning between two views of an image.

Loss and projection head come from lightly (``NTXentLoss``, ``SimCLRProjectionHead``); the other
images of the batch are the negatives, so larger batches help.
"""

from __future__ import annotations

import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from torch import nn

from models.ssl.augment import MultiViewAugment, simclr_views
from models.ssl.base import SSLModel
from models.ssl.config import PretrainConfig


class SimCLR(SSLModel):
    """Backbone + 2-layer projection head (batch norm), NT-Xent loss at ``simclr_temperature``."""

    method = "simclr"

    def __init__(self, backbone: nn.Module, config: PretrainConfig) -> None:
        super().__init__()
        self.config = config
        dim = int(backbone.num_features)  # type: ignore[arg-type]
        self.backbone = backbone
        self.projection_head = SimCLRProjectionHead(dim, config.simclr_hidden_dim, config.simclr_output_dim)
        # gather_distributed: in a torch.distributed run the negatives come from every rank's batch, so
        # the loss is the one of the global batch (a no-op in one process).
        self.criterion = NTXentLoss(temperature=config.simclr_temperature, gather_distributed=True)

    def views(self) -> MultiViewAugment:
        return simclr_views(self.config.resolution, self.config.global_crop_scale)

    def training_loss(self, views: list[torch.Tensor], step: int, total_steps: int) -> torch.Tensor:
        if len(views) != 2:
            raise ValueError(f"SimCLR takes exactly 2 views, got {len(views)}")
        # One forward for both views: batch-norm statistics over 2B images, as in SimCLR.
        z = self.projection_head(self.backbone(torch.cat(views))).float()
        z0, z1 = z.chunk(2)
        # The loss in fp32 even under bf16 autocast (cosine logits / temperature are precision-sensitive).
        with torch.autocast(device_type=z.device.type, enabled=False):
            return self.criterion(z0, z1)

    def encoder(self) -> nn.Module:
        return self.backbone
