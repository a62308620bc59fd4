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
from models.ssl.backbones import backbone_kwargs, check_input_size, create_backbone
from models.ssl.base import SSLModel
from models.ssl.config import SUPPORTED_BACKBONES, PretrainConfig, SSLMethod
from models.ssl.data import DataSummary, StepBatchSampler, pretraining_dataset, pretraining_loader
from models.ssl.dino import DINO
from models.ssl.export import export_encoder, load_encoder, read_encoder_config
from models.ssl.shards import LocalShards, S3Shards, ShardIndex, ShardSource, index_shards
from models.ssl.simclr import SimCLR
from models.ssl.stream import ShardStream
from models.ssl.training import PretrainResult, build_ssl_model, load_checkpoint, pretrain

__all__ = [
    "DINO",
    "SUPPORTED_BACKBONES",
    "AugmentConfig",
    "DataSummary",
    "LocalShards",
    "MultiViewAugment",
    "PretrainConfig",
    "PretrainResult",
    "S3Shards",
    "SSLMethod",
    "SSLModel",
    "ShardIndex",
    "ShardSource",
    "ShardStream",
    "SimCLR",
    "StepBatchSampler",
    "XRayAugment",
    "backbone_kwargs",
    "build_ssl_model",
    "check_input_size",
    "create_backbone",
    "dino_views",
    "export_encoder",
    "finetune_augmentation",
    "index_shards",
    "load_checkpoint",
    "load_encoder",
    "normalize",
    "pretrain",
    "pretraining_dataset",
    "pretraining_loader",
    "read_encoder_config",
    "simclr_views",
    "xray_augmentation",
]
