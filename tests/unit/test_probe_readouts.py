"""Linear-probe readouts (``models.probe_readouts``): the features each reads, how the probe chooses among
them on validation, and the clear errors for an unknown name or an encoder that cannot take one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.evaluation import ClassificationConfig, evaluate_classification, extract_feature_grids, extract_features
from models.evaluation.encoders import resolve_encoder
from models.probe_readouts import LINEAR_READOUTS, Readout, linear_readout
from models.ssl.backbones import create_backbone

torch.set_num_threads(1)


def _images(n: int, side: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, side, side), dtype=np.uint8)


def test_registry_names_and_unknown_names_fail() -> None:
    assert LINEAR_READOUTS["avg"] == Readout(1, 1) and linear_readout("grid2@2x") == Readout(2, 2)
    with pytest.raises(ValueError, match="unknown linear-probe readout 'grid3': choose from avg, grid2"):
        linear_readout("grid3")
    with pytest.raises(ValueError, match="unknown linear-probe readout"):
        ClassificationConfig(linear_readouts=("avg", "grid3"))
    with pytest.raises(ValueError, match="non-empty tuple"):
        ClassificationConfig(linear_readouts="grid2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-empty tuple"):
        ClassificationConfig(linear_readouts=())


def test_grid_features_are_the_pooled_map_and_grid_one_is_the_models_own_pool() -> None:
    torch.manual_seed(0)
    module = create_backbone("resnet18", 64)
    images = _images(5, 64)
    dev = torch.device("cpu")
    grids = extract_feature_grids(module, images, 0.5, 0.25, dev, [1, 2], batch_size=2)
    own = extract_features(module, images, 0.5, 0.25, dev, batch_size=2)
    assert grids[1].shape == (5, 512) and grids[2].shape == (5, 2048)
    np.testing.assert_allclose(grids[1], own, rtol=1e-5, atol=1e-5)
    # at 64 px the last ResNet-18 map is 2x2: its 2x2 grid is the map, whose mean is the global pool
    cells = grids[2].reshape(5, 512, 4)
    np.testing.assert_allclose(cells.mean(axis=2), own, rtol=1e-4, atol=1e-5)
    only_one = extract_feature_grids(module, images, 0.5, 0.25, dev, [1])
    np.testing.assert_allclose(only_one[1], own, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="positive"):
        extract_feature_grids(module, images, 0.5, 0.25, dev, [0])


def test_a_grid_readout_on_tokens_fails_clearly() -> None:
    module = create_backbone("test_vit", 32, {})
    with pytest.raises(ValueError, match="needs a spatial feature map"):
        extract_feature_grids(module, _images(2, 32), 0.5, 0.25, torch.device("cpu"), [2])


@pytest.fixture(scope="module")
def folders(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    kermany = shared_data / "kermany-pneumonia"
    if not kermany.is_dir():
        pytest.skip("kermany-pneumonia missing from the shared data")
    root = tmp_path_factory.mktemp("readouts")
    for name, start, n in (("train", 0, 16), ("test", 300, 6)):
        for label in ("NORMAL", "PNEUMONIA"):
            (root / name / label).mkdir(parents=True)
            for f in sorted((kermany / label).iterdir())[start : start + n]:
                (root / name / label / f.name).symlink_to(f)
    return root / "train", root / "test"


def test_the_probe_chooses_its_readout_on_validation(folders: tuple[Path, Path]) -> None:
    train, test = folders
    names = ("avg", "grid2@2x")
    cfg = ClassificationConfig(resolution=32, n_resamples=50, linear_c_grid=(0.1, 1.0), linear_readouts=names)
    report = evaluate_classification("scratch", train, test, config=cfg, device="cpu")
    sel = report["model_selection"]
    assert [(c["readout"], c["C"]) for c in sel["candidates"]] == [(r, c) for r in names for c in (0.1, 1.0)]
    best = max(c["validation_auc"] for c in sel["candidates"])
    first_best = next(c for c in sel["candidates"] if c["validation_auc"] == best)  # ties keep the earlier
    assert sel["chosen"] == {"C": first_best["C"], "readout": first_best["readout"]}
    assert sel["readouts"] == {"avg": {"input_px": 32, "grid": 1}, "grid2@2x": {"input_px": 64, "grid": 2}}
    assert report["resolution"] == 32 and 0.0 <= report["metrics"]["auc"]["value"] <= 1.0

    # one readout: the report keeps its former shape (no readout fields)
    plain = evaluate_classification("scratch", train, test, config=ClassificationConfig(
        resolution=32, n_resamples=50, linear_c_grid=(0.1, 1.0)), device="cpu")
    assert plain["model_selection"]["chosen"].keys() == {"C"} and "readouts" not in plain["model_selection"]
    avg_only = [c for c in sel["candidates"] if c["readout"] == "avg"]
    plain_aucs = [c["validation_auc"] for c in plain["model_selection"]["candidates"]]
    assert [c["validation_auc"] for c in avg_only] == plain_aucs


def test_a_vit_refuses_readouts_it_cannot_take_before_decoding(folders: tuple[Path, Path]) -> None:
    train, test = folders
    enc = resolve_encoder("scratch:test_vit", resolution=32, scratch_kwargs={})
    cfg = ClassificationConfig(resolution=32, linear_readouts=("avg", "grid2"))
    with pytest.raises(ValueError, match="readouts grid2 need a convolutional encoder; test_vit"):
        evaluate_classification(enc, train, test, config=cfg, device="cpu")
