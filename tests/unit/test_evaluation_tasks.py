"""Downstream evaluations end to end on tiny synthetic folders: splits, classification, segmentation, errors."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from models.data.folders import list_image_folder
from models.evaluation import (
    ClassificationConfig,
    SegmentationConfig,
    build_segmentation_model,
    evaluate_classification,
    evaluate_segmentation,
    list_mask_pairs,
    resolve_encoder,
    validation_split,
)
from models.ssl import PretrainConfig, pretrain

torch.set_num_threads(1)

TINY_RESNET = {"channels": (8, 16, 32, 64), "stem_width": 8}
TINY_CLS = ClassificationConfig(resolution=32, scratch_kwargs=TINY_RESNET, n_resamples=200, epochs=2, batch_size=16,
                                linear_c_grid=(0.01, 1.0))
TINY_SEG = SegmentationConfig(resolution=32, scratch_kwargs=TINY_RESNET, n_resamples=200, epochs=2, batch_size=8,
                              decoder_channels=(32, 16, 8, 8, 8))


def _xray(rng: np.random.Generator, sick: bool, size: int = 40) -> np.ndarray:
    """A dark noisy field; 'pneumonia' adds a bright blob (an easy, learnable difference)."""
    yy, xx = np.mgrid[:size, :size]
    img = rng.normal(70, 12, (size, size))
    if sick:
        cx, cy = rng.uniform(12, size - 12, 2)
        img += 110 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 6.0**2))
    return np.clip(img, 0, 255).astype(np.uint8)


def _classification_folder(root: Path, n_patients: int, seed: int) -> Path:
    """Kermany-style names: several images per patient, bacteria and virus images of one person."""
    rng = np.random.default_rng(seed)
    (root / "NORMAL").mkdir(parents=True)
    (root / "PNEUMONIA").mkdir()
    for p in range(n_patients):
        for k in range(1, 3):
            Image.fromarray(_xray(rng, False)).save(root / "NORMAL" / f"IM-{seed}{p:03d}-{k:04d}.png")
        Image.fromarray(_xray(rng, True)).save(root / "PNEUMONIA" / f"person{seed}{p:03d}_bacteria_{2 * p}.png")
        Image.fromarray(_xray(rng, True)).save(root / "PNEUMONIA" / f"person{seed}{p:03d}_virus_{2 * p + 1}.png")
    return root


def _segmentation_folder(root: Path, n: int, seed: int, size: int = 48) -> Path:
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        cx, cy, r = rng.uniform(16, size - 16), rng.uniform(16, size - 16), rng.uniform(7, 12)
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
        img = np.clip(rng.normal(60, 15, (size, size)) + 120 * mask, 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / "images" / f"IM-{seed}{i:03d}-0001.png")
        Image.fromarray((mask * 255).astype(np.uint8)).save(root / "masks" / f"IM-{seed}{i:03d}-0001.png")
    return root


@pytest.fixture(scope="module")
def cls_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("cls")
    return _classification_folder(base / "train", 24, 1), _classification_folder(base / "test", 8, 2)


@pytest.fixture(scope="module")
def seg_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("seg")
    return _segmentation_folder(base / "train", 20, 1), _segmentation_folder(base / "test", 6, 2)


# ---------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------


def test_validation_split_is_patient_level_stratified_and_seeded(cls_data: tuple[Path, Path]) -> None:
    records = list_image_folder(cls_data[0])
    split = validation_split(records, val_fraction=0.25, seed=0)
    train_patients = {r.patient_id for r in split.train}
    val_patients = {r.patient_id for r in split.val}
    assert not train_patients & val_patients
    assert len(split.train) + len(split.val) == len(records) and split.train_pool == len(split.train)
    assert {r.label for r in split.val} == {"normal", "pneumonia"}
    assert all(r.path.is_relative_to(cls_data[0]) for r in split.val)
    assert validation_split(records, val_fraction=0.25, seed=0) == split
    assert validation_split(records, val_fraction=0.25, seed=1).val != split.val
    # bacteria and virus images of one person stay together
    assert {r.patient_id for r in records if r.label == "pneumonia"} == {f"person1{p:03d}" for p in range(24)}
    half = validation_split(records, val_fraction=0.25, label_fraction=0.5, seed=0)
    assert half.val == split.val  # the validation split does not depend on the label fraction
    assert set(map(str, (r.path for r in half.train))) <= set(map(str, (r.path for r in split.train)))
    full, sub = Counter(r.label for r in split.train), Counter(r.label for r in half.train)
    assert all(sub[k] == round(full[k] / 2) for k in full)


def test_split_of_the_real_kermany_folder_is_patient_level(shared_data: Path) -> None:
    folder = shared_data / "kermany-pneumonia"
    if not folder.is_dir():
        pytest.skip(f"{folder} not found (set CXR_DATA_DIR)")
    records = list_image_folder(folder)
    split = validation_split(records, val_fraction=0.2, seed=0)
    assert not {r.patient_id for r in split.train} & {r.patient_id for r in split.val}
    assert 0.15 < len(split.val) / len(records) < 0.25
    share = lambda rs: sum(r.label == "pneumonia" for r in rs) / len(rs)  # noqa: E731
    assert abs(share(split.val) - share(records)) < 0.03


# ---------------------------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------------------------


def test_linear_probe_report(cls_data: tuple[Path, Path], tmp_path: Path) -> None:
    steps: list[int] = []
    report = evaluate_classification(
        "scratch", *cls_data, mode="linear", config=TINY_CLS, json_path=tmp_path / "out" / "cls.json",
        on_step=lambda s, t, m: steps.append(s), device="cpu",
    )
    assert json.loads((tmp_path / "out" / "cls.json").read_text()) == json.loads(json.dumps(report))
    assert report["task"] == "classification" and report["mode"] == "linear"
    assert report["encoder"]["source"] == "scratch:resnet18" and report["encoder"]["method"] == "scratch"
    assert report["labels"] == {"negative": "normal", "positive": "pneumonia"}
    assert report["split"]["test"] == 32 and report["split"]["train"] + report["split"]["val"] == 96
    assert report["threshold"]["rule"] == "youden" and report["threshold"]["chosen_on"] == "validation"
    assert report["model_selection"]["chosen"]["C"] in TINY_CLS.linear_c_grid
    assert set(report["metrics"]) == {"auc", "f1", "accuracy", "sensitivity", "specificity"}
    for m in report["metrics"].values():
        assert 0.0 <= m["low"] <= m["value"] <= m["high"] <= 1.0 and m["n_resamples"] == 200
    assert steps and steps == sorted(steps)


def test_model_selection_never_looks_at_the_test_folder(cls_data: tuple[Path, Path], tmp_path: Path) -> None:
    # Same test images with the labels swapped: the test metrics change, nothing chosen may change.
    swapped = tmp_path / "swapped"
    shutil.copytree(cls_data[1] / "NORMAL", swapped / "PNEUMONIA")
    shutil.copytree(cls_data[1] / "PNEUMONIA", swapped / "NORMAL")
    a = evaluate_classification("scratch", cls_data[0], cls_data[1], config=TINY_CLS, device="cpu")
    b = evaluate_classification("scratch", cls_data[0], swapped, config=TINY_CLS, device="cpu")
    for key in ("model_selection", "threshold", "validation"):
        assert a[key] == b[key], key
    assert {k: v for k, v in a["split"].items() if not k.startswith("test")} == \
           {k: v for k, v in b["split"].items() if not k.startswith("test")}
    assert a["metrics"]["auc"]["value"] == pytest.approx(1 - b["metrics"]["auc"]["value"], abs=1e-6)


def test_finetune_a_pretrained_encoder_with_a_label_fraction(cls_data: tuple[Path, Path], tmp_path: Path) -> None:
    images = np.stack([np.asarray(Image.open(p.path)) for p in list_image_folder(cls_data[0])[:16]])
    enc = pretrain(images, PretrainConfig.tiny(method="dino", max_steps=2), tmp_path / "enc", device="cpu").out_dir
    assert enc is not None
    report = evaluate_classification(enc, *cls_data, mode="finetune", label_fraction=0.5, config=TINY_CLS,
                                     device="cpu")
    assert report["encoder"]["method"] == "dino" and report["encoder"]["source"] == str(enc)
    assert report["model_selection"]["chosen"]["epoch"] in (1, 2)
    assert len(report["model_selection"]["candidates"]) == 2
    assert report["split"]["train"] == pytest.approx(report["split"]["train_pool"] / 2, abs=1)
    for m in report["metrics"].values():
        assert m["low"] <= m["value"] <= m["high"]


def _write(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)


def test_bad_classification_input(cls_data: tuple[Path, Path], tmp_path: Path) -> None:
    train, test = cls_data
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        evaluate_classification("scratch", tmp_path / "empty", test, config=TINY_CLS, device="cpu")
    one = tmp_path / "one"
    shutil.copytree(train / "NORMAL", one / "NORMAL")
    with pytest.raises(ValueError, match="only one class"):
        evaluate_classification("scratch", one, test, config=TINY_CLS, device="cpu")
    with pytest.raises(ValueError, match="only one class"):
        evaluate_classification("scratch", train, one, config=TINY_CLS, device="cpu")
    loose = tmp_path / "loose"
    _write(loose / "IM-0001-0001.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="ImageFolder"):
        evaluate_classification("scratch", loose, test, config=TINY_CLS, device="cpu")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(train, corrupt)
    (corrupt / "NORMAL" / "IM-9999-0001.png").write_bytes(b"definitely not a png")
    with pytest.raises(ValueError, match="not a readable image"):
        evaluate_classification("scratch", corrupt, test, config=TINY_CLS, device="cpu")
    with pytest.raises(ValueError, match="training folder"):
        evaluate_classification("scratch", train, train, config=TINY_CLS, device="cpu")
    with pytest.raises(FileNotFoundError, match="encoder not found"):
        evaluate_classification(tmp_path / "nope", train, test, config=TINY_CLS, device="cpu")


# ---------------------------------------------------------------------------------------------
# Segmentation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "kwargs"), [("resnet18", TINY_RESNET), ("test_vit", {})])
def test_segmentation_model_carries_the_encoder_weights(name: str, kwargs: dict[str, Any]) -> None:
    enc = resolve_encoder(f"scratch:{name}", scratch_kwargs=kwargs, resolution=32, seed=5)
    model = build_segmentation_model(enc, (32, 16, 8, 8, 8))
    inner = model.encoder.model.state_dict()  # type: ignore[union-attr]
    for k, v in enc.module.state_dict().items():
        assert torch.equal(inner[k], v), k
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 1, 32, 32)


def test_segmentation_report(seg_data: tuple[Path, Path], tmp_path: Path) -> None:
    report = evaluate_segmentation("scratch", *seg_data, mode="finetune", config=TINY_SEG,
                                   json_path=tmp_path / "seg.json", device="cpu")
    assert json.loads((tmp_path / "seg.json").read_text())["task"] == "segmentation"
    assert report["decoder"] == "smp U-Net" and report["split"]["test"] == 6
    assert report["split"]["train"] + report["split"]["val"] == 20
    assert set(report["metrics"]) == {"dice", "iou", "hd95"}
    for name in ("dice", "iou"):
        m = report["metrics"][name]
        assert 0.0 <= m["low"] <= m["value"] <= m["high"] <= 1.0
    assert report["model_selection"]["chosen"]["epoch"] in (1, 2)


def test_bad_segmentation_input(seg_data: tuple[Path, Path], tmp_path: Path) -> None:
    train, test = seg_data
    (tmp_path / "flat").mkdir()
    with pytest.raises(ValueError, match="images/ and masks/"):
        list_mask_pairs(tmp_path / "flat")
    (tmp_path / "empty" / "images").mkdir(parents=True)
    (tmp_path / "empty" / "masks").mkdir()
    with pytest.raises(ValueError, match="no images"):
        list_mask_pairs(tmp_path / "empty")
    missing = tmp_path / "missing"
    shutil.copytree(train, missing)
    (missing / "masks" / "IM-1000-0001.png").unlink()
    with pytest.raises(ValueError, match="no mask"):
        list_mask_pairs(missing)
    mismatch = tmp_path / "mismatch"
    shutil.copytree(train, mismatch)
    _write(mismatch / "masks" / "IM-1000-0001.png", np.zeros((24, 24), np.uint8))
    with pytest.raises(ValueError, match="size mismatch"):
        list_mask_pairs(mismatch)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(train, corrupt)
    (corrupt / "images" / "IM-1000-0001.png").write_bytes(b"broken")
    with pytest.raises(ValueError, match="not a readable image"):
        evaluate_segmentation("scratch", corrupt, test, config=TINY_SEG, device="cpu")
    with pytest.raises(ValueError, match="training folder"):
        evaluate_segmentation("scratch", train, train, config=TINY_SEG, device="cpu")


def test_real_lung_masks_pair_up(shared_data: Path) -> None:
    folder = shared_data / "lung-seg"
    if not folder.is_dir():
        pytest.skip(f"{folder} not found (set CXR_DATA_DIR)")
    pairs = list_mask_pairs(folder)
    assert len(pairs) > 100 and all(p.mask.name == p.image.name for p in pairs)
    assert {p.label for p in pairs} <= {"normal", "pneumonia"}
