"""Training configuration of a chest X-ray diffusion generator (UNet shape, objective, optimiser).

Defaults follow the product paper (v-prediction, cosine "sigmoid-like" beta schedule, 1000 train
steps) and were checked on the 64 px Kermany base model (see ``models/weights/generator-kermany-64``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from models.data.folders import AspectMode

PredictionType = Literal["epsilon", "v_prediction"]
BetaSchedule = Literal["squaredcos_cap_v2", "sigmoid", "linear", "scaled_linear"]


@dataclass(frozen=True)
class TrainingConfig:
    """Everything that decides what a training run learns; saved into checkpoints and exports.

    ``block_out_channels`` sets depth and width of the UNet; self-attention is used only at the
    ``attention_levels`` lowest resolutions (cheap there, and global context is what lets the model
    place the heart and diaphragm consistently). ``label_dropout`` is the probability of replacing a
    label by the null class so the same network learns the unconditional score used by
    classifier-free guidance.
    """

    resolution: int = 64
    aspect_mode: AspectMode = "pad"
    # Channels the UNet denoises: 1 for a pixel (grey) generator, the autoencoder's latent channels for a
    # latent one (``resolution`` is then the latent grid's side).
    in_channels: int = 1
    # Clamp the predicted x0 to [-1, 1]: right for pixels, wrong for latents (unit variance, unbounded).
    clip_sample: bool = True
    # UNet shape
    # Measured on the 2-core CPU box (see models/weights/generator-kermany-64/README.md): 16 channels at
    # full resolution cost 1.2 s/step at batch 16 vs 3.0 s for 32; with a fixed time budget more
    # steps of the thinner net gave the better model.
    block_out_channels: tuple[int, ...] = (16, 32, 64, 128)
    layers_per_block: int = 1
    attention_levels: int = 1
    attention_head_dim: int = 32
    norm_num_groups: int = 16
    dropout: float = 0.0
    # diffusion objective
    prediction_type: PredictionType = "v_prediction"
    beta_schedule: BetaSchedule = "squaredcos_cap_v2"
    num_train_timesteps: int = 1000
    label_dropout: float = 0.1
    # optimisation
    max_steps: int = 3000
    batch_size: int = 16
    learning_rate: float = 3e-4
    weight_decay: float = 0.01
    adam_betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 200
    grad_clip_norm: float = 1.0
    ema_decay: float = 0.999
    ema_warmup: bool = True
    # Horizontal flip is OFF on purpose: chest anatomy is not mirror-symmetric (heart and aortic
    # knob on the patient's left, liver dome on the right). Flipped training images would teach the
    # model dextrocardia / situs inversus, which then appears in synthetic data as a label-free error.
    horizontal_flip: bool = False
    seed: int = 0
    checkpoint_every: int = 100
    # fp16 halves the size of the exported weights; the pipeline upcasts to fp32 on CPU.
    export_fp16: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.resolution < 8 or self.resolution % (2 ** (len(self.block_out_channels) - 1)):
            raise ValueError(
                f"resolution {self.resolution} must be >= 8 and divisible by "
                f"2**(len(block_out_channels)-1) = {2 ** (len(self.block_out_channels) - 1)}"
            )
        if not 1 <= self.attention_levels <= len(self.block_out_channels):
            raise ValueError("attention_levels must be between 1 and len(block_out_channels)")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError("every block_out_channels entry must be divisible by norm_num_groups")
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError("label_dropout must be in [0, 1)")
        if self.max_steps <= 0 or self.batch_size <= 0:
            raise ValueError("max_steps and batch_size must be positive")
        if self.in_channels < 1:
            raise ValueError("in_channels must be >= 1")

    @classmethod
    def tiny(cls, **overrides: Any) -> TrainingConfig:
        """A few-hundred-kB generator (32 px, 2 levels) that trains in seconds on CPU, for tests."""
        base: dict[str, Any] = dict(
            resolution=32,
            block_out_channels=(16, 32),
            layers_per_block=1,
            attention_levels=1,
            attention_head_dim=8,
            norm_num_groups=8,
            max_steps=20,
            batch_size=8,
            learning_rate=1e-3,
            warmup_steps=2,
            checkpoint_every=10,
            ema_decay=0.99,
        )
        base.update(overrides)
        return cls(**base)

    def replace(self, **changes: Any) -> TrainingConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainingConfig:
        """Inverse of :meth:`to_dict`; unknown keys are rejected so typos do not pass silently."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown TrainingConfig fields: {sorted(unknown)}")
        d = dict(d)
        for key in ("block_out_channels", "adam_betas"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)

    def unet_kwargs(self, num_class_embeds: int | None) -> dict[str, Any]:
        """Keyword arguments of ``diffusers.UNet2DModel`` for this config (``in_channels`` in and out)."""
        n = len(self.block_out_channels)
        plain = n - self.attention_levels
        down = ["DownBlock2D"] * plain + ["AttnDownBlock2D"] * self.attention_levels
        up = ["AttnUpBlock2D"] * self.attention_levels + ["UpBlock2D"] * plain
        return dict(
            sample_size=self.resolution,
            in_channels=self.in_channels,
            out_channels=self.in_channels,
            block_out_channels=tuple(self.block_out_channels),
            layers_per_block=self.layers_per_block,
            down_block_types=tuple(down),
            up_block_types=tuple(up),
            attention_head_dim=self.attention_head_dim,
            norm_num_groups=self.norm_num_groups,
            dropout=self.dropout,
            num_class_embeds=num_class_embeds,
        )

    def scheduler_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``diffusers.DDPMScheduler`` (the training noise schedule)."""
        return dict(
            num_train_timesteps=self.num_train_timesteps,
            beta_schedule=self.beta_schedule,
            prediction_type=self.prediction_type,
            clip_sample=self.clip_sample,  # pixels: clamp predicted x0 to the data range [-1, 1]
        )
