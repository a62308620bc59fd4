"""Self-supervised pretraining of chest X-ray encoders (DINO, SimCLR) and their export for plain timm."""

from models.ssl.augment import (
    AugmentConfig,
    MultiViewAugment,
    XRayAugment,
    dino_views,
    finetune_augmentation,
    normalize,
    simclr_views,
    xray_augmentation,
)
from models.ssl.backbones import backbone_kwargs, create_backbone
from models.ssl.base import SSLModel
from models.ssl.config import SUPPORTED_BACKBONES, PretrainConfig, SSLMethod
from models.ssl.data import DataSummary, StepBatchSampler, pretraining_dataset
from models.ssl.dino import DINO
from models.ssl.export import export_encoder, load_encoder, read_encoder_config
from models.ssl.simclr import SimCLR
from models.ssl.training import PretrainResult, build_ssl_model, load_checkpoint, pretrain

__all__ = [
    "DINO",
    "SUPPORTED_BACKBONES",
    "AugmentConfig",
    "DataSummary",
    "MultiViewAugment",
    "PretrainConfig",
    "PretrainResult",
    "SSLMethod",
    "SSLModel",
    "SimCLR",
    "StepBatchSampler",
    "XRayAugment",
    "backbone_kwargs",
    "build_ssl_model",
    "create_backbone",
    "dino_views",
    "export_encoder",
    "finetune_augmentation",
    "load_checkpoint",
    "load_encoder",
    "normalize",
    "pretrain",
    "pretraining_dataset",
    "read_encoder_config",
    "simclr_views",
    "xray_augmentation",
]
