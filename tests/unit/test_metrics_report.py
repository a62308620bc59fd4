"""generator_report / report_for_samples end to end on small synthetic data with a tiny random classifier."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.callbacks import Canceled, OnStep
from models.data.folders import write_image_folder
from models.metrics.reference import ReferenceClassifier, ReferenceConfig, build_backbone, save_reference_classifier
from models.metrics.report import generator_report, report_for_samples

torch.set_num_threads(min(2, torch.get_num_threads()))
NAMES = ["normal", "pneumonia"]


@pytest.fixture(scope="module")
def tiny_classifier() -> ReferenceClassifier:
    torch.manual_seed(0)
    config = ReferenceConfig("test_resnet", 1, 32, 0.5, 0.25, tuple(NAMES))
    return ReferenceClassifier(build_backbone("test_resnet", 2), config, torch.device("cpu"))


def _images(labels: np.ndarray, seed: int, size: int = 32) -> np.ndarray:
    """Smooth random fields, brighter for label 1."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.random((len(labels), 1, 6, 6))).float()
    fine = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    fine = fine * 0.6 + torch.from_numpy(labels).float().view(-1, 1, 1, 1) * 0.3
    return (fine.clamp(0, 1)[:, 0].numpy() * 255).astype(np.uint8)


def test_generator_report_rows_json_grid_and_progress(tiny_classifier: ReferenceClassifier, tmp_path: Path) -> None:
    syn_labels = np.array([0, 1] * 30)
    real_labels = np.array([0] * 40 + [1] * 60)
    patients = [f"p{i // 2}" for i in range(100)]  # two images per patient
    steps: list[tuple[int, int, str]] = []
    report = generator_report(
        _images(syn_labels, 1),
        syn_labels,
        _images(real_labels, 2),
        real_labels,
        NAMES,
        real_patient_ids=patients,
        classifier=tiny_classifier,
        n_pairs=20,
        json_path=tmp_path / "report.json",
        grid_path=tmp_path / "grid.png",
        on_step=lambda s, t, m: steps.append((s, t, m)),
    )
    assert json.loads((tmp_path / "report.json").read_text()) == report
    assert Image.open(tmp_path / "grid.png").size[1] > 2 * 96
    for row in ("synthetic_vs_real", "real_vs_real"):
        r = report["rows"][row]
        assert r["fid"] >= 0 and 0 <= r["precision"] <= 1 and 0 <= r["coverage"] <= 1
        assert set(r["per_label"]) == set(NAMES) and set(r["diversity"]) == set(NAMES)
        assert 0 <= r["label_fidelity"]["auc"] <= 1
    # Equal candidate sizes and label mix in both rows; real halves never share a patient.
    assert report["rows"]["synthetic_vs_real"]["n"] == report["rows"]["real_vs_real"]["n"]
    assert report["counts"]["reference_half"] + report["counts"]["real_half_b"] == 100
    assert steps[-1][0] == steps[-1][1] and [s for s, _, _ in steps] == sorted(s for s, _, _ in steps)


def test_report_yardstick_ranks_a_shifted_generator_worse(tiny_classifier: ReferenceClassifier) -> None:
    labels = np.array([0, 1] * 40)
    real = _images(labels, 2)
    good = generator_report(_images(labels, 3), labels, real, labels, NAMES, classifier=tiny_classifier, n_pairs=10)
    shifted = np.clip(_images(labels, 3).astype(int) + 90, 0, 255).astype(np.uint8)
    bad = generator_report(shifted, labels, real, labels, NAMES, classifier=tiny_classifier, n_pairs=10)
    assert bad["rows"]["synthetic_vs_real"]["fid"] > good["rows"]["synthetic_vs_real"]["fid"]
    assert bad["rows"]["real_vs_real"] == good["rows"]["real_vs_real"]  # same yardstick, same seed


def test_report_unconditional_and_bad_input(tiny_classifier: ReferenceClassifier) -> None:
    real_labels = np.array([0, 1] * 20)
    syn = _images(np.zeros(30, dtype=np.int64), 5)
    real = _images(real_labels, 6)
    report = generator_report(syn, None, real, real_labels, NAMES, classifier=tiny_classifier, n_pairs=5)
    assert "skipped" in report["rows"]["synthetic_vs_real"]["label_fidelity"]
    assert set(report["rows"]["real_vs_real"]["diversity"]) == {"all"}
    with pytest.raises(ValueError, match="expected 30 labels"):
        generator_report(syn, [0, 1], real, real_labels, NAMES, classifier=tiny_classifier)
    with pytest.raises(ValueError, match="empty"):
        generator_report(syn[:0], None, real, real_labels, NAMES, classifier=tiny_classifier)
    with pytest.raises(ValueError, match="differ in size"):
        generator_report(syn[:, :16, :16], None, real, real_labels, NAMES, classifier=tiny_classifier)
    with pytest.raises(ValueError, match="indices into label_names"):
        generator_report(syn, np.full(30, 2), real, real_labels, NAMES, classifier=tiny_classifier)

    def cancel(step: int, total: int, message: str) -> None:
        raise Canceled

    with pytest.raises(Canceled):
        generator_report(syn, None, real, real_labels, NAMES, classifier=tiny_classifier, on_step=cancel)


def test_report_for_samples_with_a_sampler_callable(tiny_classifier: ReferenceClassifier, tmp_path: Path) -> None:
    real_labels = np.array([0] * 24 + [1] * 24)
    real_dir = write_image_folder(_images(real_labels, 7), real_labels, tmp_path / "real", ["NORMAL", "PNEUMONIA"])
    save_reference_classifier(tiny_classifier.model, tiny_classifier.config, tmp_path / "clf")
    calls: list[tuple[int, int]] = []

    def sampler(n: int, seed: int, on_step: OnStep) -> tuple[np.ndarray, np.ndarray]:
        calls.append((n, seed))
        on_step(1, 1, "sampled")
        labels = np.arange(n) % 2
        return _images(labels, seed + 100), labels

    messages: list[str] = []
    report = report_for_samples(
        sampler,
        real_dir,
        n=20,
        classifier_dir=tmp_path / "clf",
        device="cpu",
        n_pairs=5,
        json_path=tmp_path / "out" / "r.json",
        on_step=lambda s, t, m: messages.append(m),
    )
    assert calls == [(20, 0)] and messages[0] == "generate: sampled" and messages[-1].startswith("evaluate:")
    assert report["label_names"] == NAMES and report["n_requested"] == 20
    assert report["rows"]["synthetic_vs_real"]["n"] == 20
    assert (tmp_path / "out" / "r.json").is_file()
