"""Diffusion generators of grey chest X-rays: training, export (diffusers format) and sampling."""

from models.diffusion.config import TrainingConfig
from models.diffusion.export import (
    TrainingIndex,
    export_generator,
    load_training_index,
    read_generator_metadata,
    save_grid,
    write_model_card,
)
from models.diffusion.pipeline import (
    DEFAULT_STEPS,
    SAMPLERS,
    CXRDiffusionPipeline,
    GenerationOutput,
    image_seed,
    make_scheduler,
    plan_generation,
)
from models.diffusion.training import (
    TrainingData,
    TrainingResult,
    load_checkpoint,
    load_training_data,
    train_generator,
)

__all__ = [
    "DEFAULT_STEPS",
    "SAMPLERS",
    "CXRDiffusionPipeline",
    "GenerationOutput",
    "TrainingConfig",
    "TrainingData",
    "TrainingIndex",
    "TrainingResult",
    "export_generator",
    "image_seed",
    "load_checkpoint",
    "load_training_data",
    "load_training_index",
    "make_scheduler",
    "plan_generation",
    "read_generator_metadata",
    "save_grid",
    "train_generator",
    "write_model_card",
]
