"""Pneumonia-vs-normal classification on top of an encoder: linear probe or fine-tuning.

Protocol (the same for every arm of the paper table, so arms differ only by the encoder):

1. Train and test come from two ImageFolder folders (``<label>/*.png|jpg``), two classes.
2. A validation split is carved from the training folder: patient-level, stratified, seeded
   (:func:`models.evaluation.splits.validation_split`); the label fraction subsamples the rest.
3. Model selection on validation AUC only: the L2 strength ``C`` of the linear probe (and its readout
   of the frozen encoder, when ``linear_readouts`` offers several), or the epoch of fine-tuning. The
   decision threshold is chosen on the validation scores too, by a rule of
   :data:`models.evaluation.metrics.THRESHOLD_RULES` (Youden's J by default; F1-max; equal error;
   ``balanced-platt``, which does not follow the validation prevalence).
4. The test folder is scored once, by the selected model at the selected threshold: AUC, F1,
   accuracy, sensitivity, specificity with stratified bootstrap 95% CIs.
5. Optionally (``shifted_holdout``), whole patient groups of the training folder, e.g. the
   ``NORMAL2-IM-*`` acquisition batch plus a group of pneumonia patients, are set aside before step 2:
   never trained on, never used for selection, scored like the test folder (specificity at the chosen
   threshold is the number that falls when normals of a new period look different).
6. Every report carries calibration (ECE, Brier; before/after a temperature fitted on validation
   logits) and the threshold, test and shifted metrics of every registered rule (point estimates).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple, get_args

import numpy as np
import torch
from torch import nn

from models.callbacks import OnStep, no_progress
from models.data.folders import ImageRecord, images_to_array, list_image_folder
from models.device import autocast_for, pick_device
from models.evaluation.bootstrap import DEFAULT_CONFIDENCE, DEFAULT_RESAMPLES
from models.evaluation.calibration import DEFAULT_BINS, calibration_report, sigmoid
from models.evaluation.encoders import EvalEncoder, extract_feature_grids, resolve_encoder
from models.evaluation.metrics import (
    THRESHOLD_RULES,
    ThresholdRule,
    auc_rows,
    choose_threshold,
    classification_metrics,
    classification_metrics_with_ci,
    group_metrics,
    group_metrics_with_ci,
    threshold_rule,
)
from models.evaluation.splits import TrainValSplit, hold_out_groups, validation_split
from models.probe_readouts import DEFAULT_READOUT, LINEAR_READOUTS, Readout, linear_readout
from models.ssl.augment import (
    XRayAugment,
    finetune_augmentation,
    normalize,
    shift_robust_augmentation,
    to_unit_float,
)

EvalMode = Literal["linear", "finetune"]
REPORT_FORMAT = "cxrsynth-evaluation/1"

FinetuneAugmentation = Literal["mild", "shift-robust"]
# Name -> builder(size) of the on-device fine-tuning augmentation; the single source of the names
# (``FinetuneAugmentation`` must match it, checked at import time and by a unit test).
FINETUNE_AUGMENTATIONS: dict[str, Callable[[int], XRayAugment]] = {
    "mild": finetune_augmentation,  # crops keep >= 70%, +-10% intensity, no blur
    "shift-robust": shift_robust_augmentation,  # +-30% intensity, gamma 0.7-1.5, blur, crops keep >= 50%
}
if get_args(FinetuneAugmentation) != tuple(FINETUNE_AUGMENTATIONS):
    raise RuntimeError(f"FinetuneAugmentation {get_args(FinetuneAugmentation)} differs from "
                       f"FINETUNE_AUGMENTATIONS {tuple(FINETUNE_AUGMENTATIONS)}")


def finetune_augmentation_named(name: str, size: int) -> XRayAugment:
    """The registered fine-tuning augmentation ``name`` at ``size``; ``ValueError`` for an unknown name."""
    if name not in FINETUNE_AUGMENTATIONS:
        raise ValueError(f"unknown fine-tuning augmentation {name!r}: choose one of "
                         f"{', '.join(FINETUNE_AUGMENTATIONS)}")
    return FINETUNE_AUGMENTATIONS[name](size)


@dataclass(frozen=True)
class ClassificationConfig:
    """Settings of a classification evaluation other than the encoder, the data, the mode and the fraction.

    ``augmentation`` defaults to "mild", measured (docs/results/shift_robustness.md: scratch ResNet-18,
    64 px, 6 epochs, 2 seeds, NORMAL2 normals + person1500-1999 held out as the shifted group): the
    "shift-robust" preset did not raise the shifted group's specificity (0.914 at Youden, 0.929 at
    balanced-platt, vs 0.925 / 0.924 with "mild") and cost in-distribution accuracy (val AUC 0.993 vs
    0.997, test specificity 0.947 vs 1.000 at Youden) and calibration (test ECE 0.18-0.22 vs 0.08-0.09).
    ``threshold_rule`` stays "youden": "balanced-platt" gave the same figures there (shifted specificity
    0.924 vs 0.925) and is steadier under resampling; "f1" fell to 0.823 on the shifted group.
    """

    val_fraction: float = 0.2
    threshold_rule: ThresholdRule = "youden"
    resolution: int | None = None  # None: the encoder's pretraining resolution
    positive_label: str = "pneumonia"
    seed: int = 0
    # linear probe: L2-regularised logistic regression on frozen, standardised features
    linear_c_grid: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
    # LINEAR_READOUTS names offered to the probe; with more than one, validation AUC picks it with C.
    linear_readouts: tuple[str, ...] = (DEFAULT_READOUT,)
    # fine-tuning: encoder + linear head, class-weighted BCE, AdamW, cosine schedule
    epochs: int = 10
    batch_size: int = 32
    learning_rate: float = 1e-3  # encoder (4-epoch CPU check: 1e-3 >> 3e-4 > 1e-4 from scratch)
    head_learning_rate: float = 1e-3
    weight_decay: float = 0.05
    augment: bool = True  # False: no augmentation at all, whatever ``augmentation`` says
    # Which FINETUNE_AUGMENTATIONS entry; "mild" by measurement (class docstring).
    augmentation: FinetuneAugmentation = "mild"
    # scratch baseline
    scratch_model: str = "resnet18"
    scratch_kwargs: dict[str, Any] = field(default_factory=dict)
    # reporting
    n_resamples: int = DEFAULT_RESAMPLES
    confidence: float = DEFAULT_CONFIDENCE
    feature_batch_size: int = 64
    calibration_bins: int = DEFAULT_BINS
    # Patient-id glob patterns of training-folder patients set aside as a shifted held-out group
    # (e.g. ("NORMAL2-IM-*", "person1[5-9]??")); empty: none.
    shifted_holdout: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 2:
            raise ValueError("need epochs >= 1 and batch_size >= 2")
        if not self.linear_c_grid:
            raise ValueError("linear_c_grid must not be empty")
        if isinstance(self.linear_readouts, str) or not self.linear_readouts:
            raise ValueError("linear_readouts is a non-empty tuple of readout names, e.g. ('avg', 'grid2@2x')")
        for name in self.linear_readouts:
            linear_readout(name)
        threshold_rule(self.threshold_rule)  # unknown names fail here, before any training
        if self.augmentation not in FINETUNE_AUGMENTATIONS:
            raise ValueError(f"unknown fine-tuning augmentation {self.augmentation!r}: choose one of "
                             f"{', '.join(FINETUNE_AUGMENTATIONS)}")
        if isinstance(self.shifted_holdout, str):
            raise ValueError("shifted_holdout is a tuple of patterns, not one string")
        if self.calibration_bins < 2:
            raise ValueError("calibration_bins must be >= 2")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


def binary_labels(
    records: Sequence[ImageRecord], positive_label: str, where: str
) -> tuple[np.ndarray, tuple[str, str]]:
    """0/1 labels of an ImageFolder with exactly two classes; ``positive_label`` is 1 when present,
    else the second name in sorted order. Raises ``ValueError`` for unlabelled or one-class folders."""
    names = sorted({r.label for r in records if r.label is not None})
    if not names:
        raise ValueError(f"{where}: images must be in class sub-folders (ImageFolder layout), found loose images")
    if len(names) == 1:
        raise ValueError(f"{where}: only one class ({names[0]!r}); need two (e.g. normal/ and pneumonia/)")
    if len(names) > 2:
        raise ValueError(f"{where}: {len(names)} classes {names}; binary evaluation needs exactly two")
    pos = positive_label if positive_label in names else names[1]
    neg = names[0] if names[1] == pos else names[1]
    return np.array([int(r.label == pos) for r in records], dtype=np.int64), (neg, pos)


def _same_folder(a: str | Path, b: str | Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()


@dataclass(frozen=True)
class _Carved:
    """The training folder cut into training, validation and (optionally) the shifted held-out group."""

    split: TrainValSplit[ImageRecord]
    shifted: list[ImageRecord]
    y_train: np.ndarray
    y_val: np.ndarray
    y_shifted: np.ndarray


def _carve(records: list[ImageRecord], y_pool: np.ndarray, cfg: ClassificationConfig, label_fraction: float) -> _Carved:
    """Hold out the shifted patient groups (if any), then the patient-level validation split of the rest."""
    pool, shifted = hold_out_groups(records, cfg.shifted_holdout) if cfg.shifted_holdout else (records, [])
    split = validation_split(pool, val_fraction=cfg.val_fraction, label_fraction=label_fraction, seed=cfg.seed)
    index = {r.path: i for i, r in enumerate(records)}
    ys = [y_pool[[index[r.path] for r in part]].astype(np.int64) for part in (split.train, split.val, shifted)]
    for part, y in (("training", ys[0]), ("validation", ys[1])):
        if y.min() == y.max():
            raise ValueError(f"the {part} split has one class only; use more images or a larger fraction")
    return _Carved(split, shifted, *ys)


def evaluate_classification(
    encoder: str | Path | EvalEncoder,
    train_data: str | Path,
    test_data: str | Path,
    *,
    mode: EvalMode = "linear",
    label_fraction: float = 1.0,
    config: ClassificationConfig | None = None,
    json_path: str | Path | None = None,
    on_step: OnStep = no_progress,
    device: str = "auto",
    keep_scores: bool = False,
) -> dict[str, Any]:
    """Evaluate ``encoder`` (an encoder directory, ``"scratch"`` or ``"scratch:<timm name>"``) on
    pneumonia vs normal; returns the report dict (and writes it as JSON to ``json_path``).

    ``keep_scores`` adds each test image's file, label and probability (``report["scores"]["test"]``), so
    two models can be compared on the same images (a paired bootstrap).

    Raises ``ValueError`` for an empty folder, a one-class folder, a corrupt image, or test == train.
    """
    cfg = config or ClassificationConfig()
    if mode not in ("linear", "finetune"):
        raise ValueError(f"mode must be 'linear' or 'finetune', got {mode!r}")
    if _same_folder(train_data, test_data):
        raise ValueError("test_data is the training folder: give a separate test folder")
    t0 = time.perf_counter()
    dev = pick_device(device)
    train_records = list_image_folder(train_data)
    test_records = list_image_folder(test_data)
    y_pool, names = binary_labels(train_records, cfg.positive_label, f"training folder {train_data}")
    y_test, test_names = binary_labels(test_records, names[1], f"test folder {test_data}")
    if set(test_names) != set(names):
        raise ValueError(f"test classes {test_names} differ from training classes {names}")

    enc = resolve_encoder(encoder, scratch_model=cfg.scratch_model, scratch_kwargs=cfg.scratch_kwargs,
                          resolution=cfg.resolution, seed=cfg.seed)
    carved = _carve(train_records, y_pool, cfg, label_fraction)
    split = carved.split

    # Decode everything up front (fails fast on a corrupt file); the test and shifted pixels are not
    # looked at until the selected model scores them at the end.
    res = enc.resolution
    pixels = _decode(enc, _readout_scales(enc, cfg) if mode == "linear" else [1],
                     (split.train, split.val, test_records, carved.shifted))

    run = _linear_probe if mode == "linear" else _finetune
    selection, val_logits, score = run(enc, pixels, carved.y_train, carved.y_val, cfg, dev, on_step)
    logits = {"validation": (val_logits, carved.y_val), "test": (score("test"), y_test)}
    if carved.shifted:
        logits["shifted"] = (score("shifted"), carved.y_shifted)
    report: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "task": "classification",
        "mode": mode,
        "label_fraction": label_fraction,
        "encoder": enc.describe(),
        "train_data": str(train_data),
        "test_data": str(test_data),
        "labels": {"negative": names[0], "positive": names[1]},
        "resolution": res,
        "split": _split_section(carved, y_test, cfg, names),
        "model_selection": {"criterion": "validation AUC", **selection},
        **_scored_sections(logits, cfg),
        "bootstrap": {"method": "percentile, stratified by class", "n_resamples": cfg.n_resamples,
                      "confidence": cfg.confidence, "seed": cfg.seed},
        "config": cfg.to_dict(),
        "device": str(dev),
        "wall_seconds": round(time.perf_counter() - t0, 2),
    }
    if keep_scores:
        report["scores"] = {"test": {"files": [r.path.name for r in test_records], "label": y_test.tolist(),
                                     "probability": sigmoid(logits["test"][0]).tolist()}}
    if json_path is not None:
        write_report(report, json_path)
    return report


def _split_section(carved: _Carved, y_test: np.ndarray, cfg: ClassificationConfig,
                   names: tuple[str, str]) -> dict[str, Any]:
    """The report's account of the split: sizes, patients, test class counts, the shifted group."""
    return {
        **carved.split.summary(lambda r: r.label),
        "val_patients": len({r.patient_id for r in carved.split.val}),
        "test": len(y_test),
        "test_counts": {names[0]: int((y_test == 0).sum()), names[1]: int((y_test == 1).sum())},
        "patient_level": True,
        "val_fraction": cfg.val_fraction,
        "shifted_holdout": _shifted_summary(carved, cfg, names),
    }


def _shifted_summary(carved: _Carved, cfg: ClassificationConfig, names: tuple[str, str]) -> dict[str, Any] | None:
    if not carved.shifted:
        return None
    y = carved.y_shifted
    return {"patterns": list(cfg.shifted_holdout), "images": len(carved.shifted),
            "patients": len({r.patient_id for r in carved.shifted}),
            "counts": {names[0]: int((y == 0).sum()), names[1]: int((y == 1).sum())},
            "used_for": "scoring only: never trained on, never used for model or threshold selection"}


def _scored_sections(logits: dict[str, tuple[np.ndarray, np.ndarray]], cfg: ClassificationConfig) -> dict[str, Any]:
    """Threshold, validation/test(/shifted) metrics, calibration and every rule's figures from the logits.

    ``logits`` maps "validation", "test" and optionally "shifted" to (logits, 0/1 labels). Only the
    validation entry chooses anything; the others are scored at what it chose.
    """
    probs = {k: (sigmoid(z), y) for k, (z, y) in logits.items()}
    val_scores, y_val = probs["validation"]
    threshold = choose_threshold(val_scores, y_val, cfg.threshold_rule)
    ci: dict[str, Any] = {"n_resamples": cfg.n_resamples, "confidence": cfg.confidence, "seed": cfg.seed}
    test = classification_metrics_with_ci(*probs["test"], threshold, **ci)
    out: dict[str, Any] = {
        "threshold": {"rule": cfg.threshold_rule, "value": threshold, "chosen_on": "validation"},
        "validation": classification_metrics(val_scores, y_val, threshold),
        "metrics": {k: v.to_dict() for k, v in test.items()},
    }
    if "shifted" in probs:
        shifted = group_metrics_with_ci(*probs["shifted"], threshold, **ci)
        out["shifted"] = {"metrics": {k: v.to_dict() for k, v in shifted.items()}}
    out["calibration"] = calibration_report(*logits["validation"], {k: v for k, v in logits.items()
                                                                    if k != "validation"}, cfg.calibration_bins)
    out["threshold_rules"] = _rule_table(probs)
    return out


def _rule_table(probs: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """Every registered rule's validation threshold and the point metrics it gives on each split."""
    table: dict[str, Any] = {}
    for name in THRESHOLD_RULES:
        thr = choose_threshold(*probs["validation"], name)  # type: ignore[arg-type]
        table[name] = {"value": thr, **{k: group_metrics(s, y, thr) for k, (s, y) in probs.items()}}
    return table


def write_report(report: dict[str, Any], path: str | Path) -> Path:
    """Write an evaluation report as indented JSON (parent folders created)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2, allow_nan=True) + "\n")
    tmp.replace(p)
    return p


class _Pixels(NamedTuple):
    """The decoded uint8 images of each part of an evaluation, at one input size."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    shifted: np.ndarray


def _decode(enc: EvalEncoder, scales: Sequence[int], parts: Sequence[Sequence[ImageRecord]]) -> dict[int, _Pixels]:
    """The images of the four parts (train, validation, test, shifted) at each input scale a readout needs."""
    return {s: _Pixels(*(images_to_array([r.path for r in rs], enc.resolution * s, enc.aspect_mode, threads=2)  # type: ignore[arg-type]
                         for rs in parts))
            for s in scales}


def _readout_scales(enc: EvalEncoder, cfg: ClassificationConfig) -> list[int]:
    """The input scales the configured readouts need; ``ValueError`` (before any decoding) for a readout
    other than "avg" on a fixed-input-size encoder (a ViT takes one size and ends in tokens)."""
    readouts = {name: linear_readout(name) for name in cfg.linear_readouts}
    if enc.fixed_input_size and any(r != LINEAR_READOUTS[DEFAULT_READOUT] for r in readouts.values()):
        other = ", ".join(n for n, r in readouts.items() if r != LINEAR_READOUTS[DEFAULT_READOUT])
        raise ValueError(f"linear-probe readouts {other} need a convolutional encoder; {enc.model_name} takes one "
                         f"input size and ends in tokens: use ({DEFAULT_READOUT!r},)")
    return sorted({r.scale for r in readouts.values()})


def _linear_probe(
    enc: EvalEncoder, pixels: dict[int, _Pixels], y_train: np.ndarray, y_val: np.ndarray,
    cfg: ClassificationConfig, dev: torch.device, on_step: OnStep,
) -> tuple[dict[str, Any], np.ndarray, Callable[[str], np.ndarray]]:
    """Frozen features + scikit-learn logistic regression; ``C`` (and the readout, when several are
    offered) chosen by validation AUC.

    Returns the selection, the validation logits and a function giving the logits of a part ("test",
    "shifted").
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    module = enc.module.to(dev)
    readouts = {name: linear_readout(name) for name in cfg.linear_readouts}
    total = 2 * len(pixels) + len(readouts) * len(cfg.linear_c_grid)
    step = 0
    feats: dict[Readout, tuple[np.ndarray, np.ndarray]] = {}
    for scale, px in pixels.items():
        grids = sorted({r.grid for r in readouts.values() if r.scale == scale})
        parts = []
        for part, images in (("training", px.train), ("validation", px.val)):
            parts.append(extract_feature_grids(module, images, enc.mean, enc.std, dev, grids, cfg.feature_batch_size))
            step += 1
            on_step(step, total, f"features: {part} split at {enc.resolution * scale} px")
        feats.update({Readout(scale, g): (parts[0][g], parts[1][g]) for g in grids})
    candidates: list[dict[str, Any]] = []
    best: tuple[float, str, Any, Any] | None = None
    for name, readout in readouts.items():
        f_train, f_val = feats[readout]
        scaler = StandardScaler().fit(f_train)
        z_train, z_val = scaler.transform(f_train), scaler.transform(f_val)
        for c in cfg.linear_c_grid:
            clf = LogisticRegression(C=c, class_weight="balanced", max_iter=2000)
            clf.fit(z_train, y_train)
            auc = float(auc_rows(clf.predict_proba(z_val)[:, 1], y_val)[0])
            candidates.append({"C": c, "readout": name, "validation_auc": auc} if len(readouts) > 1 else
                              {"C": c, "validation_auc": auc})
            # ties keep the earlier readout and the smaller C (stronger regularisation)
            if best is None or auc > best[0]:
                best = (auc, name, scaler, clf)
            step += 1
            on_step(step, total, f"linear probe {name} C={c:g}: validation AUC {auc:.4f}")
    assert best is not None
    _, chosen, scaler, clf = best
    readout = readouts[chosen]
    val_logits = np.asarray(clf.decision_function(scaler.transform(feats[readout][1])), dtype=np.float64)

    def score(part: str) -> np.ndarray:
        images = getattr(pixels[readout.scale], part)
        if len(images) == 0:
            return np.zeros(0)
        f = extract_feature_grids(module, images, enc.mean, enc.std, dev, [readout.grid], cfg.feature_batch_size)
        return np.asarray(clf.decision_function(scaler.transform(f[readout.grid])), dtype=np.float64)

    selection: dict[str, Any] = {"chosen": {"C": float(clf.C)}, "validation_auc": best[0], "candidates": candidates,
                                 "head": "logistic regression (L2, class-balanced) on standardised frozen features"}
    if len(readouts) > 1:
        selection["chosen"]["readout"] = chosen
        selection["readouts"] = {n: {"input_px": enc.resolution * r.scale, "grid": r.grid} for n, r in readouts.items()}
    return selection, val_logits, score


class _Classifier(nn.Module):
    def __init__(self, backbone: nn.Module, dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x)).squeeze(1)


@torch.inference_mode()
def _predict(model: nn.Module, images: np.ndarray, enc: EvalEncoder, dev: torch.device, batch: int) -> np.ndarray:
    """Float64 logits of uint8 images (logits, not probabilities: temperature scaling needs them)."""
    model.eval()
    out = [np.zeros(0)]
    for i in range(0, len(images), batch):
        x = normalize(to_unit_float(torch.from_numpy(images[i : i + batch]).to(dev)), enc.mean, enc.std)
        with autocast_for(dev):
            out.append(model(x).float().cpu().numpy().astype(np.float64))
    return np.concatenate(out)


def _batches(n: int, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Shuffled index batches; a trailing batch of one is dropped (batch norm needs two images)."""
    perm = torch.randperm(n, generator=gen)
    chunks = list(perm.split(batch_size))
    if len(chunks) > 1 and len(chunks[-1]) < 2:
        chunks.pop()
    return chunks


def _finetune(
    enc: EvalEncoder, pixels: dict[int, _Pixels], y_train: np.ndarray, y_val: np.ndarray,
    cfg: ClassificationConfig, dev: torch.device, on_step: OnStep,
) -> tuple[dict[str, Any], np.ndarray, Callable[[str], np.ndarray]]:
    """Encoder + linear head trained end to end; the epoch with the best validation AUC is kept.

    Returns the selection, the validation logits and a function giving the logits of a part ("test",
    "shifted").
    """
    from lightly.utils.scheduler import CosineWarmupScheduler

    x_train, x_val = pixels[1].train, pixels[1].val

    torch.manual_seed(cfg.seed)
    model = _Classifier(enc.fresh_copy(), enc.num_features).to(dev)
    augment = finetune_augmentation_named(cfg.augmentation, enc.resolution).to(dev) if cfg.augment else None
    optimizer = torch.optim.AdamW(
        [{"params": model.backbone.parameters(), "lr": cfg.learning_rate},
         {"params": model.head.parameters(), "lr": cfg.head_learning_rate}],
        weight_decay=cfg.weight_decay,
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    per_epoch = len(_batches(len(x_train), cfg.batch_size, torch.Generator().manual_seed(0)))
    total = per_epoch * cfg.epochs
    scheduler = CosineWarmupScheduler(optimizer, warmup_epochs=min(per_epoch, total // 10), max_epochs=total)
    n_pos = int(y_train.sum())
    # Class-weighted loss: Kermany is ~3:1 pneumonia:normal; weighting keeps the head from ignoring normals.
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor((len(y_train) - n_pos) / max(1, n_pos), device=dev))
    images, targets = torch.from_numpy(x_train), torch.from_numpy(y_train).float()
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    history: list[dict[str, float]] = []
    step = 0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        for idx in _batches(len(x_train), cfg.batch_size, gen):
            x = to_unit_float(images[idx].to(dev))
            if augment is not None:
                x = augment(x)
            x = normalize(x, enc.mean, enc.std)
            with autocast_for(dev):
                logits = model(x)
            loss = loss_fn(logits.float(), targets[idx].to(dev))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            on_step(step, total, f"fine-tune epoch {epoch}/{cfg.epochs} loss {loss.item():.4f}")
        val_auc = float(auc_rows(_predict(model, x_val, enc, dev, cfg.feature_batch_size), y_val)[0])
        history.append({"epoch": epoch, "validation_auc": val_auc})
        if best is None or val_auc > best[0]:  # ties keep the earlier epoch
            best = (val_auc, epoch, copy.deepcopy(model.state_dict()))
    assert best is not None
    model.load_state_dict(best[2])
    val_logits = _predict(model, x_val, enc, dev, cfg.feature_batch_size)

    def score(part: str) -> np.ndarray:
        return _predict(model, getattr(pixels[1], part), enc, dev, cfg.feature_batch_size)

    selection = {"chosen": {"epoch": best[1]}, "validation_auc": best[0], "candidates": history,
                 "head": "linear head on the fine-tuned encoder, class-weighted BCE",
                 "augmentation": cfg.augmentation if cfg.augment else None}
    return selection, val_logits, score
