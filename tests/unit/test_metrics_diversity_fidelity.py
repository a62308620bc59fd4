"""MS-SSIM diversity and label fidelity on inputs with known answers, and their input errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.metrics.diversity import (
    diversity_by_label,
    mean_pairwise_ms_ssim,
    ms_ssim_pairs,
    ms_ssim_settings,
    sample_pairs,
)
from models.metrics.fidelity import label_fidelity, label_fidelity_from_proba, positive_targets
from models.metrics.images import check_images

torch.set_num_threads(min(2, torch.get_num_threads()))


def _smooth_images(n: int, size: int = 64, seed: int = 0) -> np.ndarray:
    """Chest-like test images: a smooth random field per image, uint8."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.random((n, 1, 8, 8))).float()
    fine = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    return (fine.clamp(0, 1)[:, 0].numpy() * 255).astype(np.uint8)


def test_ms_ssim_settings_fit_small_images() -> None:
    s64 = ms_ssim_settings(64)
    assert s64["scales"] == 3 and sum(s64["betas"]) == pytest.approx(1.0, abs=1e-5)
    assert ms_ssim_settings(28)["scales"] == 2
    assert ms_ssim_settings(256)["scales"] == 5
    with pytest.raises(ValueError, match="too small"):
        ms_ssim_settings(8)


def test_ms_ssim_identical_is_one_and_noise_is_small() -> None:
    imgs = _smooth_images(6)
    assert ms_ssim_pairs(imgs, imgs).numpy() == pytest.approx(np.ones(6), abs=1e-5)
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (6, 64, 64), dtype=np.uint8)
    b = rng.integers(0, 256, (6, 64, 64), dtype=np.uint8)
    assert float(ms_ssim_pairs(a, b).max()) < 0.1
    # Float [0, 1] tensors give the same values as uint8.
    t = torch.from_numpy(imgs).float() / 255.0
    assert ms_ssim_pairs(t, t.flip(0)).numpy() == pytest.approx(ms_ssim_pairs(imgs, imgs[::-1]).numpy(), abs=1e-5)


def test_diversity_collapsed_set_scores_one_and_varied_set_lower() -> None:
    varied = _smooth_images(20)
    collapsed = np.repeat(varied[:1], 20, axis=0)
    assert mean_pairwise_ms_ssim(collapsed, n_pairs=30)["ms_ssim_mean"] == pytest.approx(1.0, abs=1e-4)
    div = mean_pairwise_ms_ssim(varied, n_pairs=30, seed=3)
    assert div["pairs"] == 30 and div["ms_ssim_mean"] < 0.9
    assert div == mean_pairwise_ms_ssim(varied, n_pairs=30, seed=3)  # seeded
    by_label = diversity_by_label(varied, np.array([0] * 19 + [1]), ["normal", "pneumonia"], n_pairs=10)
    assert by_label["normal"]["pairs"] == 10 and "skipped" in by_label["pneumonia"]


def test_sample_pairs_are_distinct_unordered_pairs() -> None:
    for n, k in ((5, 100), (50, 200), (1000, 300)):
        pairs = sample_pairs(n, k, seed=0)
        assert len(pairs) == min(k, n * (n - 1) // 2)
        assert (pairs[:, 0] < pairs[:, 1]).all() and pairs.max() < n
        assert len({tuple(p) for p in pairs}) == len(pairs)
    with pytest.raises(ValueError):
        sample_pairs(1, 10)


def test_image_checks_give_clear_errors() -> None:
    with pytest.raises(ValueError, match="empty"):
        check_images(np.zeros((0, 64, 64), np.uint8))
    with pytest.raises(ValueError, match="grey images"):
        check_images(np.zeros((2, 3, 64, 64), np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        check_images(torch.full((2, 64, 64), -1.0))
    with pytest.raises(ValueError, match="same shape"):
        ms_ssim_pairs(np.zeros((2, 64, 64), np.uint8), np.zeros((3, 64, 64), np.uint8))


class _FakeClassifier:
    """Predicts from the mean brightness: perfectly separates bright (positive) from dark images."""

    def __init__(self, random: bool = False) -> None:
        self.random = random

    def predict_proba(self, images: np.ndarray | torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        t = check_images(images).float()
        if self.random:
            return torch.rand(t.shape[0], generator=torch.Generator().manual_seed(0))
        return (t.mean(dim=(1, 2, 3)) / 255.0).clamp(0, 1)


def test_label_fidelity_perfect_and_random_classifiers() -> None:
    rng = np.random.default_rng(0)
    labels = np.array([0, 1] * 100)
    images = np.where(labels[:, None, None] == 1, 200, 50).astype(np.uint8) + rng.integers(
        0, 40, (200, 32, 32), dtype=np.uint8
    )
    names = ["normal", "pneumonia"]
    perfect = label_fidelity(images, labels, names, _FakeClassifier())
    assert perfect["auc"] == 1.0 and perfect["accuracy"] == 1.0 and perfect["n_positive"] == 100
    chance = label_fidelity(images, labels, names, _FakeClassifier(random=True))
    assert 0.35 < chance["auc"] < 0.65
    # Label order in label_names decides which index is positive.
    swapped = label_fidelity(images, 1 - labels, ["pneumonia", "normal"], _FakeClassifier())
    assert swapped["auc"] == 1.0


def test_label_fidelity_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="both classes"):
        label_fidelity_from_proba([0.1, 0.9, 0.4], [1, 1, 1])
    with pytest.raises(ValueError, match="expected 3 labels"):
        label_fidelity_from_proba(torch.tensor([0.1, 0.9, 0.4]), [0, 1])
    with pytest.raises(ValueError, match="empty"):
        label_fidelity_from_proba(torch.tensor([]), [])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        label_fidelity_from_proba(torch.tensor([0.1, 1.5]), [0, 1])
    with pytest.raises(ValueError, match="0 \\(negative\\) or 1"):
        label_fidelity_from_proba(torch.tensor([0.1, 0.5]), [0, 2])
    with pytest.raises(ValueError, match="two labels including"):
        positive_targets([0, 1, 2], ["normal", "bacteria", "virus"], "pneumonia")
    with pytest.raises(ValueError, match="expected 3 labels"):
        label_fidelity(np.zeros((3, 32, 32), np.uint8), [0, 1], ["normal", "pneumonia"], _FakeClassifier())
