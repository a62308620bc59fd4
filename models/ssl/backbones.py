"""timm backbones for grey radiographs: one input channel, no classifier, never hub weights.

Everything the exported encoder needs to be rebuilt is the timm model name plus the keyword
arguments returned by :func:`backbone_kwargs`; :func:`models.ssl.export.load_encoder` passes the same
ones back to ``timm.create_model``.
"""

from __future__ import annotations

from typing import Any

import timm
from torch import nn


def is_fixed_input_size(model_name: str) -> bool:
    """True for models whose positional embedding fixes the input size (ViT and friends)."""
    try:
        cfg = timm.models.get_pretrained_cfg(model_name)
    except Exception:  # unknown tag / no pretrained cfg registered: assume a CNN
        return False
    return bool(cfg is not None and getattr(cfg, "fixed_input_size", False))


def backbone_kwargs(model_name: str, resolution: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """``timm.create_model`` keyword arguments (beyond ``in_chans``/``num_classes``) for a backbone.

    Fixed-input-size models (ViT) get ``img_size = resolution`` so the positional embedding matches
    the training resolution, and ``dynamic_img_size=True`` so the same weights accept DINO's smaller
    local crops (timm interpolates the positional embedding on the fly; the weights are unchanged).
    """
    kwargs = dict(extra or {})
    if not timm.is_model(model_name):
        raise ValueError(f"unknown timm model {model_name!r}")
    if is_fixed_input_size(model_name):
        kwargs.setdefault("img_size", resolution)
        kwargs.setdefault("dynamic_img_size", True)
    return kwargs


def create_backbone(model_name: str, resolution: int, extra: dict[str, Any] | None = None) -> nn.Module:
    """A randomly initialised timm backbone with one input channel and no classifier head.

    ``pretrained=False`` always: the product never loads hub weights (ImageNet weights would also
    defeat the point of measuring what synthetic-X-ray pretraining alone gives).
    """
    kwargs = backbone_kwargs(model_name, resolution, extra)
    model = timm.create_model(model_name, in_chans=1, num_classes=0, pretrained=False, **kwargs)
    if not isinstance(getattr(model, "num_features", None), int):
        raise ValueError(f"timm model {model_name!r} does not expose num_features")
    check_input_size(model, model_name, resolution)
    return model


def check_input_size(model: nn.Module, model_name: str, size: int, what: str = "resolution") -> None:
    """Raise ``ValueError`` when ``model`` cannot take ``size x size`` images, before any training.

    A ViT needs a multiple of its patch size, at least one patch (timm would only assert on the first
    forward pass); a model whose timm config names a ``min_input_size`` needs at least that.
    """
    ps = patch_size(model)
    if ps is not None and (size < ps or size % ps):
        if size < ps:
            problem, fix = f"below the minimum of one {ps} px patch", f"{ps}"
        else:
            problem, fix = f"not a multiple of the patch size {ps}", f"{size // ps * ps} or {(size // ps + 1) * ps}"
        raise ValueError(f"{what} {size} px is {problem} of {model_name}; use e.g. {fix}")
    cfg = getattr(model, "pretrained_cfg", None) or {}
    minimum = cfg.get("min_input_size") if isinstance(cfg, dict) else None
    if minimum and size < int(minimum[-1]):
        raise ValueError(f"{what} {size} px is below the minimum input size {minimum[-1]} px of {model_name}")


def patch_size(model: nn.Module) -> int | None:
    """Patch size of a ViT-like backbone (``None`` for CNNs)."""
    pe = getattr(model, "patch_embed", None)
    ps = getattr(pe, "patch_size", None)
    if ps is None:
        return None
    return int(ps[0]) if isinstance(ps, tuple | list) else int(ps)

