"""Lung segmentation on top of an encoder: a segmentation-models-pytorch decoder, MONAI metrics.

Layout: ``ROOT/images/NAME.png`` and ``ROOT/masks/NAME.png`` (masks 0 = background, 255 = lung),
optionally ``ROOT/labels.csv`` (``filename,label``) used to stratify the validation split.

Model: CNN encoders (ResNet-18/50) get smp's U-Net through its timm-universal encoder
(``encoder_name="tu-<timm name>"``, ``in_channels=1``); ViT encoders get smp's DPT decoder (the
ViT analogue of a U-Net in smp: it taps 4 transformer blocks), since a U-Net needs a feature
pyramid a plain ViT does not have. In both cases smp builds the same timm model inside
``model.encoder.model``, and the pretrained backbone's state dict is loaded into it (every backbone
weight must match). ``mode="linear"`` freezes the encoder (decoder-only training), ``"finetune"``
trains everything with a lower encoder learning rate.

Training: MONAI ``DiceCELoss``, joint kornia augmentation of image and mask, model selection on
validation Dice (the patient-level split of the training folder). Test metrics (Dice, IoU, HD95 in
pixels) are computed per image at the masks' native resolution (predicted logits are mapped back
through the resize), then averaged with bootstrap 95% CIs.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from models.callbacks import OnStep, no_progress
from models.data.folders import IMAGE_SUFFIXES, ImageRecord, load_grey, patient_id_from_name
from models.device import autocast_for, pick_device
from models.evaluation.bootstrap import DEFAULT_CONFIDENCE, DEFAULT_RESAMPLES
from models.evaluation.classification import EvalMode, write_report
from models.evaluation.encoders import EvalEncoder, resolve_encoder
from models.evaluation.metrics import segmentation_metrics, summarise_per_image
from models.evaluation.splits import TrainValSplit, validation_split
from models.ssl.augment import normalize, to_unit_float

REPORT_FORMAT = "cxrsynth-evaluation/1"


@dataclass(frozen=True)
class MaskPair:
    """One image with its lung mask, the patient it belongs to and its label (``None`` if unknown)."""

    image: Path
    mask: Path
    patient_id: str
    label: str | None = None


@dataclass(frozen=True)
class SegmentationConfig:
    """Settings of a segmentation evaluation other than the encoder, the data, the mode and the fraction."""

    val_fraction: float = 0.2
    resolution: int | None = None  # None: the encoder's pretraining resolution
    seed: int = 0
    epochs: int = 20
    batch_size: int = 8
    learning_rate: float = 1e-3  # encoder (fine-tuning); same as the decoder unless told otherwise
    decoder_learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    augment: bool = True
    decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16)  # U-Net; DPT uses its defaults / 4
    scratch_model: str = "resnet18"
    scratch_kwargs: dict[str, Any] = field(default_factory=dict)
    n_resamples: int = DEFAULT_RESAMPLES
    confidence: float = DEFAULT_CONFIDENCE

    def __post_init__(self) -> None:
        if len(self.decoder_channels) != 5:
            raise ValueError("decoder_channels must have 5 entries (one per U-Net stage)")
        if self.epochs < 1 or self.batch_size < 2:
            raise ValueError("need epochs >= 1 and batch_size >= 2")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


def _image_files(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES}


def _read_labels(root: Path) -> dict[str, str]:
    path = root / "labels.csv"
    if not path.is_file():
        return {}
    with open(path, newline="") as fh:
        return {Path(row["filename"]).stem: row["label"].lower() for row in csv.DictReader(fh)
                if row.get("filename") and row.get("label")}


def list_mask_pairs(root: str | Path) -> list[MaskPair]:
    """Pair ``images/NAME.*`` with ``masks/NAME.*`` (same stem) and check sizes from the file headers.

    Raises ``FileNotFoundError`` for a missing folder and ``ValueError`` for a wrong layout, an empty
    folder, images without a mask, or an image and mask of different sizes.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root}")
    img_dir, mask_dir = root / "images", root / "masks"
    if not img_dir.is_dir() or not mask_dir.is_dir():
        raise ValueError(f"{root}: expected images/ and masks/ sub-folders (segmentation layout)")
    images, masks = _image_files(img_dir), _image_files(mask_dir)
    if not images:
        raise ValueError(f"no images found in {img_dir}")
    missing = sorted(set(images) - set(masks))
    if missing:
        shown = ", ".join(images[m].name for m in missing[:5])
        raise ValueError(f"{len(missing)} image(s) in {img_dir} have no mask in {mask_dir}: {shown}")
    labels = _read_labels(root)
    pairs = []
    for stem, img in images.items():
        m = masks[stem]
        try:
            with Image.open(img) as a, Image.open(m) as b:
                size_i, size_m = a.size, b.size
        except Exception as exc:
            raise ValueError(f"not a readable image: {img.name} or {m.name} ({exc})") from exc
        if size_i != size_m:
            raise ValueError(f"image/mask size mismatch for {img.name}: image {size_i}, mask {size_m}")
        pairs.append(MaskPair(img, m, patient_id_from_name(img.name), labels.get(stem)))
    return pairs


def _binary_mask(path: Path, size: int | None, aspect: str) -> np.ndarray:
    m = load_grey(path, size, aspect)  # type: ignore[arg-type]
    return (m >= 128 if m.max() > 1 else m > 0).astype(np.uint8)


def _load_pairs(pairs: list[MaskPair], size: int, aspect: str) -> tuple[np.ndarray, np.ndarray]:
    x = np.stack([load_grey(p.image, size, aspect) for p in pairs])  # type: ignore[arg-type]
    y = np.stack([_binary_mask(p.mask, size, aspect) for p in pairs])
    return x, y


def build_segmentation_model(enc: EvalEncoder, decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16)) -> nn.Module:
    """smp U-Net (CNN) or DPT (ViT) on the timm encoder, with the encoder's weights loaded into it."""
    import segmentation_models_pytorch as smp

    kwargs = dict(enc.timm_kwargs)
    if enc.fixed_input_size:
        if "depth" in kwargs:
            raise ValueError("smp's DPT reserves the 'depth' keyword; use a registered timm ViT name instead")
        kwargs.setdefault("img_size", enc.resolution)  # the pretraining grid; dynamic_img_size adapts it
        width = max(8, decoder_channels[0] // 4)
        model: nn.Module = smp.DPT(
            encoder_name=f"tu-{enc.model_name}", encoder_weights=None, in_channels=1, classes=1,
            decoder_intermediate_channels=(width, width * 2, width * 4, width * 4), decoder_fusion_channels=width,
            num_classes=0, **kwargs,
        )
    else:
        model = smp.Unet(
            encoder_name=f"tu-{enc.model_name}", encoder_weights=None, in_channels=1, classes=1,
            decoder_channels=tuple(decoder_channels), **kwargs,
        )
    timm_model: nn.Module = model.encoder.model  # type: ignore[union-attr,assignment]
    result = timm_model.load_state_dict(enc.module.state_dict(), strict=False)
    if result.missing_keys:
        raise RuntimeError(f"encoder weights do not fit smp's {enc.model_name}: missing {result.missing_keys[:5]}")
    return model


def _joint_augmentation(size: int) -> nn.Module:
    """Geometric augmentation applied identically to image and mask, intensity to the image only.

    Small affine jitter (positioning, +-10 degrees, +-10% scale) and exposure changes; no flips
    (anatomy is not mirror-symmetric: the left lung is smaller, the heart sits on the left).
    """
    import kornia.augmentation as K

    return K.AugmentationSequential(
        K.RandomAffine(degrees=10.0, translate=(0.05, 0.05), scale=(0.9, 1.1), p=0.7),
        K.RandomBrightness(brightness=(0.9, 1.1), p=0.5),
        K.RandomContrast(contrast=(0.9, 1.1), p=0.5),
        data_keys=["input", "mask"],
    )


def _native_logits(logits: torch.Tensor, native: tuple[int, int], size: int, aspect: str) -> torch.Tensor:
    """Map ``(1, 1, size, size)`` logits back to a ``(h, w)`` native image through the resize."""
    h, w = native
    if aspect == "pad" and h != w:
        scale = size / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        left, top = (size - nw) // 2, (size - nh) // 2
        logits = logits[:, :, top : top + nh, left : left + nw]
    return F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)


@torch.inference_mode()
def _predict_logits(
    model: nn.Module, images: np.ndarray, enc: EvalEncoder, dev: torch.device, batch: int
) -> torch.Tensor:
    model.eval()
    out = []
    for i in range(0, len(images), batch):
        x = normalize(to_unit_float(torch.from_numpy(images[i : i + batch]).to(dev)), enc.mean, enc.std)
        with autocast_for(dev):
            out.append(model(x).float().cpu())
    return torch.cat(out)


@dataclass(frozen=True)
class _SegmentationData:
    """The decoded pixels of a run: training and validation at the encoder's size, test masks native."""

    split: TrainValSplit[MaskPair]
    test_pairs: list[MaskPair]
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test_native: list[np.ndarray]


def _split_and_load(
    train_pairs: list[MaskPair], test_pairs: list[MaskPair], enc: EvalEncoder, cfg: SegmentationConfig,
    label_fraction: float,
) -> _SegmentationData:
    """Patient-level train/validation split of the training pairs, then decode every image and mask."""
    records = [ImageRecord(p.image, p.label, p.patient_id) for p in train_pairs]
    split = validation_split(records, train_pairs, val_fraction=cfg.val_fraction, label_fraction=label_fraction,
                             seed=cfg.seed)
    res, aspect = enc.resolution, enc.aspect_mode
    x_train, y_train = _load_pairs(split.train, res, aspect)
    x_val, y_val = _load_pairs(split.val, res, aspect)
    x_test = np.stack([load_grey(p.image, res, aspect) for p in test_pairs])  # type: ignore[arg-type]
    y_test_native = [_binary_mask(p.mask, None, aspect) for p in test_pairs]
    return _SegmentationData(split, test_pairs, x_train, y_train, x_val, y_val, x_test, y_test_native)


def _seeded_model(
    enc: EvalEncoder, cfg: SegmentationConfig, mode: EvalMode, dev: torch.device
) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer]:
    """The seeded segmenter, its encoder (frozen for ``linear``) and AdamW over what trains."""
    torch.manual_seed(cfg.seed)
    enc_copy = dataclasses.replace(enc, module=enc.fresh_copy())
    model = build_segmentation_model(enc_copy, cfg.decoder_channels).to(dev)
    encoder_module: nn.Module = model.encoder  # type: ignore[assignment]
    if mode == "linear":
        for p in encoder_module.parameters():
            p.requires_grad_(False)
    decoder_params = [p for n, p in model.named_parameters() if not n.startswith("encoder.") and p.requires_grad]
    groups: list[dict[str, Any]] = [{"params": decoder_params, "lr": cfg.decoder_learning_rate}]
    if mode == "finetune":
        groups.append({"params": list(encoder_module.parameters()), "lr": cfg.learning_rate})
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    return model, encoder_module, optimizer


def _train_and_select(
    model: nn.Module, encoder_module: nn.Module, optimizer: torch.optim.Optimizer, data: _SegmentationData,
    enc: EvalEncoder, cfg: SegmentationConfig, mode: EvalMode, dev: torch.device, on_step: OnStep,
) -> dict[str, Any]:
    """Train with Dice + CE; load the epoch with the best validation Dice into ``model``; the selection."""
    from monai.losses import DiceCELoss

    loss_fn = DiceCELoss(sigmoid=True)
    augment = _joint_augmentation(enc.resolution).to(dev) if cfg.augment else None
    gen = torch.Generator().manual_seed(cfg.seed)
    n = len(data.x_train)
    per_epoch = max(1, n // cfg.batch_size + (1 if n % cfg.batch_size >= 2 else 0))
    total = per_epoch * cfg.epochs
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    xt, yt = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    history: list[dict[str, float]] = []
    step = 0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        if mode == "linear":
            encoder_module.eval()  # frozen: keep its batch-norm statistics as pretrained
        perm = torch.randperm(n, generator=gen)
        for idx in perm.split(cfg.batch_size):
            if len(idx) < 2 and n >= 2:
                continue  # batch norm needs two images
            x = to_unit_float(xt[idx].to(dev))
            y = yt[idx].to(dev).unsqueeze(1).float()
            if augment is not None:
                x, y = augment(x, y)
                y = (y > 0.5).float()
            with autocast_for(dev):
                logits = model(normalize(x, enc.mean, enc.std))
            loss = loss_fn(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            on_step(min(step, total), total, f"segmentation epoch {epoch}/{cfg.epochs} loss {loss.item():.4f}")
        val_logits = _predict_logits(model, data.x_val, enc, dev, cfg.batch_size)
        val_dice = float(np.nanmean(segmentation_metrics(val_logits > 0,
                                                         torch.from_numpy(data.y_val).unsqueeze(1))["dice"]))
        history.append({"epoch": epoch, "validation_dice": val_dice})
        if best is None or val_dice > best[0]:  # ties keep the earlier epoch
            best = (val_dice, epoch, copy.deepcopy(model.state_dict()))
    assert best is not None
    model.load_state_dict(best[2])
    return {"criterion": "validation Dice", "chosen": {"epoch": best[1]}, "validation_dice": best[0],
            "candidates": history}


def _score_test(
    model: nn.Module, data: _SegmentationData, enc: EvalEncoder, cfg: SegmentationConfig, dev: torch.device
) -> dict[str, np.ndarray]:
    """Per test image Dice, IoU and HD95 at the mask's native resolution (logits mapped back through the resize)."""
    test_logits = _predict_logits(model, data.x_test, enc, dev, cfg.batch_size)
    per_image: dict[str, list[float]] = {"dice": [], "iou": [], "hd95": []}
    for i, target in enumerate(data.y_test_native):
        native = _native_logits(test_logits[i : i + 1], target.shape, enc.resolution,  # type: ignore[arg-type]
                                enc.aspect_mode)
        vals = segmentation_metrics(native > 0, torch.from_numpy(target)[None, None])
        for k in per_image:
            per_image[k].append(float(vals[k][0]))
    return {k: np.asarray(v) for k, v in per_image.items()}


def _scored_sections(arrays: dict[str, np.ndarray], cfg: SegmentationConfig) -> dict[str, Any]:
    """Test metrics with bootstrap CIs from the per-image arrays, and how many HD95 values were undefined."""
    metrics = summarise_per_image(arrays, n_resamples=cfg.n_resamples, confidence=cfg.confidence, seed=cfg.seed)
    return {
        "metrics": {k: v.to_dict() for k, v in metrics.items()},
        "hd95_undefined": int(np.isnan(arrays["hd95"]).sum()),
        "metric_notes": "per test image at the mask's native resolution, then the mean; HD95 in pixels, "
                        "undefined (skipped) when the prediction is empty",
    }


def evaluate_segmentation(
    encoder: str | Path | EvalEncoder,
    train_data: str | Path,
    test_data: str | Path,
    *,
    mode: EvalMode = "finetune",
    label_fraction: float = 1.0,
    config: SegmentationConfig | None = None,
    json_path: str | Path | None = None,
    on_step: OnStep = no_progress,
    device: str = "auto",
) -> dict[str, Any]:
    """Train a lung segmenter on ``encoder`` and report test Dice, IoU and HD95 with bootstrap CIs.

    ``encoder`` is an encoder directory, ``"scratch"`` or ``"scratch:<timm name>"``. Raises
    ``ValueError`` for an empty folder, a missing mask, an image/mask size mismatch, a corrupt image,
    or test == train.
    """
    cfg = config or SegmentationConfig()
    if mode not in ("linear", "finetune"):
        raise ValueError(f"mode must be 'linear' or 'finetune', got {mode!r}")
    if Path(train_data).resolve() == Path(test_data).resolve():
        raise ValueError("test_data is the training folder: give a separate test folder")
    t0 = time.perf_counter()
    dev = pick_device(device)
    train_pairs = list_mask_pairs(train_data)
    test_pairs = list_mask_pairs(test_data)
    enc = resolve_encoder(encoder, scratch_model=cfg.scratch_model, scratch_kwargs=cfg.scratch_kwargs,
                          resolution=cfg.resolution, seed=cfg.seed)
    if enc.aspect_mode == "center-crop":
        raise ValueError("segmentation needs an invertible resize: use an encoder with aspect mode 'pad' or 'squash'")
    data = _split_and_load(train_pairs, test_pairs, enc, cfg, label_fraction)

    model, encoder_module, optimizer = _seeded_model(enc, cfg, mode, dev)
    selection = _train_and_select(model, encoder_module, optimizer, data, enc, cfg, mode, dev, on_step)
    arrays = _score_test(model, data, enc, cfg, dev)
    report: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "task": "segmentation",
        "mode": mode,
        "label_fraction": label_fraction,
        "encoder": enc.describe(),
        "train_data": str(train_data),
        "test_data": str(test_data),
        "resolution": enc.resolution,
        "decoder": "smp DPT" if enc.fixed_input_size else "smp U-Net",
        "split": {
            **data.split.summary(),
            "val_patients": len({p.patient_id for p in data.split.val}),
            "test": len(test_pairs),
            "patient_level": True,
            "val_fraction": cfg.val_fraction,
        },
        "model_selection": selection,
        **_scored_sections(arrays, cfg),
        "bootstrap": {"method": "percentile over images", "n_resamples": cfg.n_resamples,
                      "confidence": cfg.confidence, "seed": cfg.seed},
        "config": cfg.to_dict(),
        "device": str(dev),
        "wall_seconds": round(time.perf_counter() - t0, 2),
    }
    if json_path is not None:
        write_report(report, json_path)
    return report
