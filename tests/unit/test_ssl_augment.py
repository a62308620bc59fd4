"""On-device kornia augmentation of grey radiographs: shapes, dtype, range, views, and no flip by default."""

from __future__ import annotations

import kornia.augmentation as K
import pytest
import torch

from models.ssl.augment import (
    AugmentConfig,
    XRayAugment,
    dino_views,
    finetune_augmentation,
    normalize,
    simclr_views,
    to_unit_float,
)

torch.set_num_threads(1)


def _batch(n: int = 6, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 1, size, size), dtype=torch.uint8, generator=g)


def test_view_keeps_batch_dtype_and_unit_range() -> None:
    x = _batch()
    torch.manual_seed(0)
    out = XRayAugment(AugmentConfig(size=24, solarize_p=0.5))(x)
    assert out.shape == (6, 1, 24, 24) and out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    # (B, H, W) uint8 and [0, 1] float inputs are accepted alike
    assert XRayAugment(AugmentConfig(size=32))(x[:, 0]).shape == (6, 1, 32, 32)
    assert torch.equal(to_unit_float(x), x.float() / 255)


def test_views_are_random_per_image_and_seeded() -> None:
    x = _batch()
    aug = XRayAugment(AugmentConfig(size=32))
    torch.manual_seed(1)
    a = aug(x)
    torch.manual_seed(1)
    b = aug(x)
    assert torch.equal(a, b)
    torch.manual_seed(2)
    assert not torch.equal(a, aug(x))


def test_no_horizontal_flip_unless_asked() -> None:
    cfg = AugmentConfig(size=32)
    ops = [type(m) for m in XRayAugment(cfg).pipeline.children()]
    assert K.RandomHorizontalFlip not in ops and K.RandomVerticalFlip not in ops
    assert not any("Hue" in t.__name__ or "Saturation" in t.__name__ or "ColorJ" in t.__name__ for t in ops)
    for views in (dino_views(32, 16, 2), simclr_views(32)):
        for v in views.views:
            assert K.RandomHorizontalFlip not in [type(m) for m in v.pipeline.children()]  # type: ignore[union-attr]
    # With every random op switched off and a full-size crop, the output is the input: no flip.
    identity = AugmentConfig(size=32, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), rotation_p=0.0,
                             intensity_p=0.0, gamma_p=0.0, blur_p=0.0)
    x = torch.rand(4, 1, 32, 32)
    torch.manual_seed(0)
    assert torch.allclose(XRayAugment(identity)(x), x, atol=1e-5)
    flip = XRayAugment(AugmentConfig(size=32, horizontal_flip_p=1.0, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0),
                                     rotation_p=0.0, intensity_p=0.0, gamma_p=0.0, blur_p=0.0))
    assert torch.allclose(flip(x), x.flip(-1), atol=1e-5)


def test_dino_multicrop_and_simclr_views() -> None:
    x = _batch(4, 32)
    torch.manual_seed(0)
    views = dino_views(32, 16, n_local=3)(x)
    assert [tuple(v.shape) for v in views] == [(4, 1, 32, 32)] * 2 + [(4, 1, 16, 16)] * 3
    # DINO's asymmetric recipe: solarize on the second global view only
    names = [[type(m).__name__ for m in v.pipeline.children()] for v in dino_views(32, 16, 1).views]  # type: ignore[union-attr]
    assert "RandomSolarize" not in names[0] and "RandomSolarize" in names[1] and "RandomSolarize" not in names[2]
    pair = simclr_views(32)(x)
    assert len(pair) == 2 and not torch.equal(pair[0], pair[1])
    assert finetune_augmentation(32)(x).shape == (4, 1, 32, 32)


def test_normalize_and_bad_input() -> None:
    x = torch.full((1, 1, 4, 4), 0.75)
    assert torch.allclose(normalize(x, 0.5, 0.25), torch.ones_like(x))
    with pytest.raises(ValueError, match="grey"):
        to_unit_float(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="probability"):
        AugmentConfig(size=32, blur_p=1.5)
