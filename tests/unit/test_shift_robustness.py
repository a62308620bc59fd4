"""Robustness to a shift of period / prevalence: threshold rules, calibration, the shift-robust
augmentation and the shifted held-out patient group (synthetic data, plus a real-folder split check)."""

from __future__ import annotations

import dataclasses
import shutil
import warnings
from pathlib import Path
from typing import get_args

import kornia.augmentation as K
import numpy as np
import pytest
import torch
from PIL import Image

from models.data.folders import list_image_folder
from models.evaluation import (
    FINETUNE_AUGMENTATIONS,
    THRESHOLD_RULES,
    ClassificationConfig,
    FinetuneAugmentation,
    ThresholdRule,
    auc_rows,
    calibration_metrics,
    calibration_report,
    choose_threshold,
    evaluate_classification,
    finetune_augmentation_named,
    fit_temperature,
    group_metrics,
    group_metrics_with_ci,
    hold_out_groups,
    validation_split,
)
from models.evaluation.calibration import sigmoid
from models.ssl.augment import finetune_augmentation, shift_robust_augmentation

torch.set_num_threads(1)

TINY = ClassificationConfig(resolution=32, scratch_kwargs={"channels": (8, 16, 32, 64), "stem_width": 8},
                            n_resamples=200, epochs=2, batch_size=16, linear_c_grid=(0.01, 1.0))
SHIFTED = ("NORMAL2-IM-*", "person9*")


# ---------------------------------------------------------------------------------------------
# Registries
# ---------------------------------------------------------------------------------------------


def test_registries_drive_the_choices_and_unknown_names_fail_loudly() -> None:
    assert get_args(ThresholdRule) == tuple(THRESHOLD_RULES)
    assert {"youden", "f1", "balanced-platt"} <= set(THRESHOLD_RULES)
    assert get_args(FinetuneAugmentation) == tuple(FINETUNE_AUGMENTATIONS) == ("mild", "shift-robust")
    s, y = np.array([0.1, 0.2, 0.35, 0.4, 0.7, 0.9]), np.array([0, 0, 0, 1, 1, 1])
    for rule in THRESHOLD_RULES:
        assert 0.2 < choose_threshold(s, y, rule) <= 0.4, rule  # type: ignore[arg-type]  # all rules separate
    with pytest.raises(ValueError, match=r"unknown threshold rule 'accuracy'.*balanced-platt"):
        choose_threshold(s, y, "accuracy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown threshold rule"):
        ClassificationConfig(threshold_rule="youdens")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown fine-tuning augmentation 'strong'"):
        ClassificationConfig(augmentation="strong")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown fine-tuning augmentation"):
        finetune_augmentation_named("none", 32)
    with pytest.raises(ValueError, match="tuple of patterns"):
        ClassificationConfig(shifted_holdout="NORMAL2-IM-*")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="probabilities"):
        choose_threshold(s * 4 - 1, y, "balanced-platt")
    with pytest.warns(RuntimeWarning, match="do not increase"):  # a model below chance: the equal-error cut
        assert choose_threshold(1 - s, y, "balanced-platt") == choose_threshold(1 - s, y, "equal-error")


# ---------------------------------------------------------------------------------------------
# Threshold rules under a change of validation prevalence
# ---------------------------------------------------------------------------------------------


def _resampled_thresholds(rule: str, prevalence: float, n_sets: int = 30, n: int = 400) -> np.ndarray:
    """Logit thresholds of ``rule`` on validation sets drawn at ``prevalence`` from one population whose
    class-conditional logits are N(-1.5, 1) and N(+1.5, 1): the prevalence-free optimum is logit 0."""
    out = []
    for seed in range(n_sets):
        rng = np.random.default_rng(seed)
        n_pos = round(n * prevalence)
        z = np.r_[rng.normal(-1.5, 1.0, n - n_pos), rng.normal(1.5, 1.0, n_pos)]
        y = np.r_[np.zeros(n - n_pos, np.int64), np.ones(n_pos, np.int64)]
        t = choose_threshold(sigmoid(z), y, rule)  # type: ignore[arg-type]
        out.append(np.log(t / (1 - t)))
    return np.array(out)


def test_balanced_platt_threshold_ignores_the_validation_prevalence_while_youden_and_f1_move() -> None:
    t = {rule: {p: _resampled_thresholds(rule, p) for p in (0.2, 0.8)} for rule in THRESHOLD_RULES}
    shift = {rule: abs(v[0.2].mean() - v[0.8].mean()) for rule, v in t.items()}
    rms = {rule: float(np.sqrt(np.mean(np.r_[v[0.2], v[0.8]] ** 2))) for rule, v in t.items()}
    # F1-max follows the prevalence: positive-heavy validation sets pull its cut far down.
    assert t["f1"][0.2].mean() - t["f1"][0.8].mean() > 0.5
    # balanced-platt: the same cut at 20% and 80% pneumonia, close to the optimum on every resample.
    assert shift["balanced-platt"] < 0.1 and rms["balanced-platt"] < 0.15
    # Youden's J is prevalence-free only on average: its argmax jumps from one resample to the next.
    assert rms["youden"] > 1.5 * rms["balanced-platt"]
    assert max(abs(v[0.2] - v[0.8]).max() for v in (t["youden"],)) > 0.3
    assert shift["equal-error"] < 0.15  # sensitivity == specificity: prevalence-free too


# ---------------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------------


def test_calibration_metrics_on_known_inputs() -> None:
    # Two 50%-accurate images at 0.9 (gap 0.4) and two negatives at 0.2 (gap 0.2): ECE = 0.4/2 + 0.2/2.
    m = calibration_metrics(np.array([0.9, 0.9, 0.2, 0.2]), np.array([1, 0, 0, 0]))
    assert m["ece"] == pytest.approx(0.3) and m["brier"] == pytest.approx((0.01 + 0.81 + 0.04 + 0.04) / 4)
    perfect = calibration_metrics(np.array([1.0, 0.0, 1.0]), np.array([1, 0, 1]))
    assert perfect == {"ece": pytest.approx(0.0), "brier": pytest.approx(0.0)}
    normals = calibration_metrics(np.array([0.1, 0.3]), np.array([0, 0]))  # one class is fine
    assert normals["ece"] == pytest.approx(0.2) and normals["brier"] == pytest.approx(0.05)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        calibration_metrics(np.array([1.5, 0.2]), np.array([1, 0]))
    with pytest.raises(ValueError, match="as many"):
        calibration_metrics(np.array([0.5]), np.array([1, 0]))


def test_temperature_scaling_repairs_an_overconfident_model() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(0.0, 2.0, 6000)
    y = (rng.random(6000) < sigmoid(z)).astype(np.int64)  # z are calibrated logits...
    over = 4.0 * z  # ...so 4 z is four times too confident
    assert fit_temperature(over[:3000], y[:3000]) == pytest.approx(4.0, rel=0.1)
    assert fit_temperature(z[:3000], y[:3000]) == pytest.approx(1.0, rel=0.1)
    report = calibration_report(over[:3000], y[:3000], {"test": (over[3000:], y[3000:])})
    for split in ("validation", "test"):
        before, after = report[split]["before"], report[split]["after"]
        assert after["ece"] < before["ece"] / 3 and after["brier"] < before["brier"], split
    assert report["test"]["after"]["ece"] < 0.04 and report["fitted_on"] == "validation"
    # A temperature never changes the ranking: AUC is the same before and after.
    assert auc_rows(over / report["temperature"], y)[0] == pytest.approx(auc_rows(over, y)[0])


def test_one_class_groups_report_the_defined_rate_only() -> None:
    s = np.array([0.1, 0.4, 0.6, 0.9])
    assert group_metrics(s, np.zeros(4), 0.5) == {"specificity": 0.5}
    assert group_metrics(s, np.ones(4), 0.5) == {"sensitivity": 0.5}
    assert set(group_metrics(s, np.array([0, 0, 1, 1]), 0.5)) == {"auc", "f1", "accuracy", "sensitivity",
                                                                  "specificity"}
    est = group_metrics_with_ci(s, np.zeros(4), 0.5, n_resamples=200)["specificity"]
    assert est.value == 0.5 and est.low < 0.5 < est.high


# ---------------------------------------------------------------------------------------------
# Augmentation
# ---------------------------------------------------------------------------------------------


def test_shift_robust_augmentation_is_batched_per_image_in_range_and_stronger_than_mild() -> None:
    g = torch.Generator().manual_seed(0)
    one = torch.randint(0, 256, (1, 1, 48, 48), dtype=torch.uint8, generator=g)
    one[..., :4, :] = 255  # saturated rows: brightening must not leave [0, 1]
    batch = one.expand(32, 1, 48, 48).contiguous()  # 32 copies of ONE image
    aug = finetune_augmentation_named("shift-robust", 40)
    torch.manual_seed(0)
    out = aug(batch)
    assert out.shape == (32, 1, 40, 40) and out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    flat = out.flatten(1)
    assert torch.cdist(flat, flat).add(torch.eye(32) * 1e9).min() > 0  # every copy got its own parameters
    ops = {type(m) for m in aug.pipeline.children()}
    assert {K.RandomResizedCrop, K.RandomBrightness, K.RandomContrast, K.RandomGamma, K.RandomGaussianBlur} <= ops
    assert K.RandomHorizontalFlip not in ops
    torch.manual_seed(0)
    mild = finetune_augmentation(40)(batch)
    # Wider exposure changes: the per-image mean grey level spreads more than under the mild preset.
    assert out.mean(dim=(1, 2, 3)).std() > 1.5 * mild.mean(dim=(1, 2, 3)).std()
    assert isinstance(shift_robust_augmentation(40).pipeline, K.AugmentationSequential)


# ---------------------------------------------------------------------------------------------
# Shifted held-out patient group
# ---------------------------------------------------------------------------------------------


def _xray(rng: np.random.Generator, sick: bool, offset: float = 0.0, size: int = 40) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    img = rng.normal(70 + offset, 12, (size, size))
    if sick:
        cx, cy = rng.uniform(12, size - 12, 2)
        img += 110 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 10.0**2))  # large: learnable by a probe
    return np.clip(img, 0, 255).astype(np.uint8)


def _folder(root: Path, n: int, seed: int, shifted: bool) -> Path:
    """Kermany-style names; with ``shifted``, a brighter NORMAL2-IM-* batch and person9xx pneumonia patients."""
    rng = np.random.default_rng(seed)
    for sub in ("NORMAL", "PNEUMONIA"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for p in range(n):
        for k in (1, 2):
            Image.fromarray(_xray(rng, False)).save(root / "NORMAL" / f"IM-{seed}{p:03d}-000{k}.png")
        Image.fromarray(_xray(rng, True)).save(root / "PNEUMONIA" / f"person{seed}{p:02d}_bacteria_{2 * p}.png")
        Image.fromarray(_xray(rng, True)).save(root / "PNEUMONIA" / f"person{seed}{p:02d}_virus_{2 * p + 1}.png")
    if shifted:
        for p in range(n // 2):
            for k in (1, 2):
                Image.fromarray(_xray(rng, False, offset=40)).save(root / "NORMAL" / f"NORMAL2-IM-{p:04d}-000{k}.png")
            Image.fromarray(_xray(rng, True, offset=40)).save(root / "PNEUMONIA" / f"person9{p:02d}_bacteria_{p}.png")
    return root


@pytest.fixture(scope="module")
def shift_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("shift")
    return _folder(base / "train", 24, 1, shifted=True), _folder(base / "test", 8, 2, shifted=False)


def test_hold_out_groups_takes_whole_patients_and_never_leaks_them(shift_data: tuple[Path, Path]) -> None:
    records = list_image_folder(shift_data[0])
    kept, held = hold_out_groups(records, SHIFTED)
    held_ids = {r.patient_id for r in held}
    assert held_ids == {f"NORMAL2-IM-{p:04d}" for p in range(12)} | {f"person9{p:02d}" for p in range(12)}
    assert len(kept) + len(held) == len(records) and len(held) == 12 * 3
    split = validation_split(kept, val_fraction=0.25, seed=0)
    assert not held_ids & {r.patient_id for r in split.train + split.val}
    with pytest.raises(ValueError, match="matches no patient"):
        hold_out_groups(records, ("NORMAL3-*",))
    with pytest.raises(ValueError, match="every patient"):
        hold_out_groups(records, ("*",))


@pytest.mark.parametrize("mode", ["linear", "finetune"])
def test_shifted_group_is_scored_but_never_trained_on_or_selected_with(
    shift_data: tuple[Path, Path], tmp_path: Path, mode: str
) -> None:
    # Swap the labels of the held-out patients only: if they fed training, selection or the threshold,
    # something chosen would change; only the shifted group's own scores may.
    train, test = shift_data
    swapped = tmp_path / "swapped"
    shutil.copytree(train, swapped)
    for f in (swapped / "NORMAL").glob("NORMAL2-IM-*"):
        f.rename(swapped / "PNEUMONIA" / f.name)
    for f in (swapped / "PNEUMONIA").glob("person9*"):
        f.rename(swapped / "NORMAL" / f.name)
    cfg = dataclasses.replace(TINY, shifted_holdout=SHIFTED, augmentation="shift-robust",
                              threshold_rule="balanced-platt")
    with warnings.catch_warnings():
        # The tiny fine-tuned net does not learn in 2 epochs (balanced-platt then warns); the probe does.
        warnings.simplefilter("ignore" if mode == "finetune" else "error", RuntimeWarning)
        a = evaluate_classification("scratch", train, test, mode=mode, config=cfg, device="cpu")  # type: ignore[arg-type]
        b = evaluate_classification("scratch", swapped, test, mode=mode, config=cfg, device="cpu")  # type: ignore[arg-type]
    for key in ("model_selection", "threshold", "validation", "metrics"):
        assert a[key] == b[key], key
    assert a["shifted"] != b["shifted"]
    if mode == "linear":
        assert a["validation"]["auc"] > 0.75  # the probe learns, so balanced-platt fits (no warning)
        # the labels were swapped, the scores were not: the shifted AUC flips
        assert a["shifted"]["metrics"]["auc"]["value"] == pytest.approx(1 - b["shifted"]["metrics"]["auc"]["value"])
    else:
        assert a["model_selection"]["augmentation"] == "shift-robust"
    assert a["threshold"]["rule"] == "balanced-platt"
    held = a["split"]["shifted_holdout"]
    assert held["images"] == 36 and held["counts"] == {"normal": 24, "pneumonia": 12} and held["patients"] == 24
    assert a["split"]["train"] + a["split"]["val"] + held["images"] == len(list_image_folder(train))
    assert set(a["shifted"]["metrics"]) == {"auc", "f1", "accuracy", "sensitivity", "specificity"}
    cal = a["calibration"]
    assert set(cal) >= {"temperature", "validation", "test", "shifted"} and cal["temperature"] > 0
    assert set(cal["shifted"]["before"]) == {"ece", "brier"}
    assert set(a["threshold_rules"]) == set(THRESHOLD_RULES)
    assert a["threshold_rules"]["balanced-platt"]["value"] == a["threshold"]["value"]
    assert a["threshold_rules"]["balanced-platt"]["test"]["specificity"] == a["metrics"]["specificity"]["value"]


def test_every_report_has_calibration_even_without_a_shifted_group(shift_data: tuple[Path, Path]) -> None:
    report = evaluate_classification("scratch", *shift_data, mode="linear", config=TINY, device="cpu")
    assert report["split"]["shifted_holdout"] is None and "shifted" not in report
    cal = report["calibration"]
    assert set(cal) >= {"temperature", "validation", "test"} and "shifted" not in cal
    for part in ("validation", "test"):
        for when in ("before", "after"):
            assert 0.0 <= cal[part][when]["ece"] <= 1.0 and 0.0 <= cal[part][when]["brier"] <= 1.0
    assert set(report["threshold_rules"]["youden"]) == {"value", "validation", "test"}


def test_real_kermany_shifted_group_is_patient_disjoint(shared_data: Path) -> None:
    folder = shared_data / "kermany-pneumonia"
    if not folder.is_dir():
        pytest.skip(f"{folder} not found (set CXR_DATA_DIR)")
    records = list_image_folder(folder)
    kept, held = hold_out_groups(records, ("NORMAL2-IM-*", "person1[5-9]??"))
    assert {r.label for r in held} == {"normal", "pneumonia"}
    assert all(r.path.name.startswith("NORMAL2-IM-") for r in held if r.label == "normal")
    assert not any(r.path.name.startswith("NORMAL2-") for r in kept)
    split = validation_split(kept, val_fraction=0.2, seed=0)
    assert not {r.patient_id for r in held} & {r.patient_id for r in split.train + split.val}
