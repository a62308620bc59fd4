"""The shipped reference classifier: loads, gives finite features, separates real images; input handling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.metrics.fid import domain_fid
from models.metrics.fidelity import label_fidelity
from models.metrics.reference import (
    SHIPPED_DIR,
    ReferenceClassifier,
    ReferenceConfig,
    build_backbone,
    load_reference_classifier,
    save_reference_classifier,
)

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="module")
def shipped() -> ReferenceClassifier:
    return load_reference_classifier(device="cpu")


def test_shipped_files_and_config() -> None:
    weights = SHIPPED_DIR / "model.safetensors"
    assert weights.is_file() and weights.stat().st_size <= 25 * 1024 * 1024
    assert (SHIPPED_DIR / "README.md").is_file()
    cfg = json.loads((SHIPPED_DIR / "config.json").read_text())
    assert cfg["version"] == "1" and cfg["in_chans"] == 1 and cfg["resolution"] == 64
    assert cfg["label_names"] == ["normal", "pneumonia"]
    assert {"auc", "accuracy"} <= set(cfg["validation"])


def test_shipped_classifier_features_are_finite(shipped: ReferenceClassifier) -> None:
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (5, 64, 64), dtype=np.uint8)
    feats, probs = shipped.features_and_proba(imgs, batch_size=2)
    assert feats.shape == (5, shipped.num_features) and torch.isfinite(feats).all()
    assert probs.shape == (5,) and ((probs >= 0) & (probs <= 1)).all()
    # Float [0, 1] tensors, (N, 1, H, W) and other sizes (resized to 64 px) are accepted alike.
    as_float = torch.from_numpy(imgs).float().div(255).unsqueeze(1)
    assert torch.allclose(shipped.features(as_float), feats, atol=1e-4)
    big = torch.nn.functional.interpolate(as_float, size=(128, 128), mode="nearest")
    assert shipped.features(big).shape == feats.shape


def test_shipped_classifier_separates_real_images(shipped: ReferenceClassifier, shared_data: Path) -> None:
    from models.data.folders import images_to_array, list_image_folder

    folder = shared_data / "kermany-pneumonia"
    if not folder.is_dir():
        pytest.skip(f"{folder} not found (set CXR_DATA_DIR)")
    records = list_image_folder(folder)
    rng = np.random.default_rng(0)
    picked = [
        int(i)
        for lab in ("normal", "pneumonia")
        for i in rng.choice([i for i, r in enumerate(records) if r.label == lab], 40, replace=False)
    ]
    images = images_to_array([records[i].path for i in picked], 64, threads=2)
    labels = np.array([0] * 40 + [1] * 40)
    result = label_fidelity(images, labels, ["normal", "pneumonia"], shipped)
    assert result["auc"] > 0.85, result
    # Domain FID: normal vs pneumonia images are farther apart than two halves of the same class.
    normal, pneu = images[:40], images[40:]
    assert domain_fid(normal[:20], normal[20:], shipped) < domain_fid(normal, pneu, shipped)


def test_config_round_trip_and_bad_directories(tmp_path: Path) -> None:
    config = ReferenceConfig("test_resnet", 1, 32, 0.5, 0.25, ("normal", "pneumonia"))
    model = build_backbone("test_resnet", 2)
    save_reference_classifier(model, config, tmp_path)
    loaded = load_reference_classifier(tmp_path, device="cpu")
    assert loaded.config == config and loaded.resolution == 32
    x = np.random.default_rng(0).integers(0, 256, (3, 32, 32), dtype=np.uint8)
    ref = ReferenceClassifier(model, config, torch.device("cpu"))
    # Shipped weights are fp16: predictions agree with the fp32 model to fp16 precision.
    assert torch.allclose(loaded.predict_proba(x), ref.predict_proba(x), atol=5e-3)
    with pytest.raises(FileNotFoundError):
        load_reference_classifier(tmp_path / "missing")
    bad = config.to_json() | {"version": "9"}
    (tmp_path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="version"):
        load_reference_classifier(tmp_path)
    with pytest.raises(ValueError, match="empty"):
        ref.features(np.zeros((0, 32, 32), np.uint8))
