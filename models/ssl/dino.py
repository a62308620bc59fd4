"""DINO (Caron et al. 2021), the product paper's method: self-distillation with a momentum teacher.

Losses, heads and the momentum utilities come from lightly (``DINOLoss``, ``DINOProjectionHead``,
``update_momentum``, ``cosine_schedule``); this module wires them to a timm backbone and the
multi-crop views of :mod:`models.ssl.augment`.
"""

from __future__ import annotations

import copy
import warnings

import torch
from lightly.loss import DINOLoss
from lightly.models.modules import DINOProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.utils.scheduler import cosine_schedule
from torch import nn

from models.ssl.augment import MultiViewAugment, dino_views
from models.ssl.backbones import patch_size
from models.ssl.base import SSLModel
from models.ssl.config import PretrainConfig


class DINO(SSLModel):
    """Student and teacher (backbone + DINO head); the teacher is an EMA of the student.

    * Teacher momentum follows a cosine schedule from ``momentum_start`` to ``momentum_end`` over the
      run (DINO: 0.996 -> 1), via lightly's ``cosine_schedule`` and ``update_momentum``.
    * Teacher temperature warms up linearly from ``warmup_teacher_temp`` to ``teacher_temp`` over
      ``warmup_teacher_temp_steps`` steps; the teacher sees the 2 global views only, the student all.
    * Heads use batch norm with CNN backbones (DINO's ResNet recipe) and none with ViTs.
    """

    method = "dino"

    def __init__(self, backbone: nn.Module, config: PretrainConfig) -> None:
        super().__init__()
        self.config = config
        dim = int(backbone.num_features)  # type: ignore[arg-type]
        ps = patch_size(backbone)
        if ps is not None and (config.local_size % ps or config.resolution % ps):
            raise ValueError(
                f"ViT patch size {ps} must divide the global ({config.resolution}) and local "
                f"({config.local_size}) crop sizes"
            )
        use_bn = ps is None

        def head() -> DINOProjectionHead:
            with warnings.catch_warnings():
                # lightly builds the last layer with torch's deprecated weight_norm: not ours to fix.
                warnings.simplefilter("ignore", FutureWarning)
                return DINOProjectionHead(
                    dim, config.dino_hidden_dim, config.dino_bottleneck_dim, config.dino_output_dim,
                    batch_norm=use_bn, freeze_last_layer=config.freeze_last_layer_steps,
                )

        self.student_backbone = backbone
        self.student_head = head()
        self.teacher_backbone = copy.deepcopy(backbone)
        # A fresh head loaded with the student's weights: lightly's head uses weight_norm, which
        # deepcopy does not support; DINO starts the teacher as an exact copy of the student.
        self.teacher_head = head()
        self.teacher_head.load_state_dict(self.student_head.state_dict())
        deactivate_requires_grad(self.teacher_backbone)
        deactivate_requires_grad(self.teacher_head)
        self.criterion = DINOLoss(
            output_dim=config.dino_output_dim,
            warmup_teacher_temp=config.warmup_teacher_temp,
            teacher_temp=config.teacher_temp,
            warmup_teacher_temp_epochs=1,  # unused: the temperature is passed per step
            student_temp=config.student_temp,
            center_momentum=config.center_momentum,
        )

    def views(self) -> MultiViewAugment:
        c = self.config
        return dino_views(c.resolution, c.local_size, c.n_local_crops, c.global_crop_scale, c.local_crop_scale)

    def teacher_temperature(self, step: int) -> float:
        """Linear warm-up of the teacher temperature, then constant."""
        c = self.config
        if step >= c.warmup_teacher_temp_steps:
            return c.teacher_temp
        frac = step / max(1, c.warmup_teacher_temp_steps)
        return c.warmup_teacher_temp + frac * (c.teacher_temp - c.warmup_teacher_temp)

    def momentum(self, step: int, total_steps: int) -> float:
        """Teacher EMA momentum at ``step`` (cosine from ``momentum_start`` to ``momentum_end``)."""
        return float(cosine_schedule(step, total_steps, self.config.momentum_start, self.config.momentum_end))

    def training_loss(self, views: list[torch.Tensor], step: int, total_steps: int) -> torch.Tensor:
        if len(views) < 2:
            raise ValueError("DINO needs the 2 global views first")
        globals_, locals_ = views[:2], views[2:]
        with torch.no_grad():
            t = self.teacher_head(self.teacher_backbone(torch.cat(globals_)))
        teacher_out = [o.float() for o in t.chunk(2)]
        s = self.student_head(self.student_backbone(torch.cat(globals_)))
        student_out = [o.float() for o in s.chunk(2)]
        if locals_:
            s_loc = self.student_head(self.student_backbone(torch.cat(locals_)))
            student_out += [o.float() for o in s_loc.chunk(len(locals_))]
        # The loss in fp32 even under bf16 autocast (its einsum would otherwise run in bf16).
        with torch.autocast(device_type=views[0].device.type, enabled=False):
            return self.criterion(teacher_out, student_out, teacher_temp=self.teacher_temperature(step))

    def before_optimizer_step(self, step: int, total_steps: int) -> None:
        # DINO keeps the last layer fixed for the first steps to avoid early collapse (lightly's
        # "epoch" argument counts our steps here).
        self.student_head.cancel_last_layer_gradients(current_epoch=step)

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        m = self.momentum(step, total_steps)
        update_momentum(self.student_backbone, self.teacher_backbone, m)
        update_momentum(self.student_head, self.teacher_head, m)

    def encoder(self) -> nn.Module:
        return self.teacher_backbone

    def trainable_modules(self) -> nn.Module:
        return nn.ModuleList([self.student_backbone, self.student_head])
