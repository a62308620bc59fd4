"""The model card (``README.md``) of a shipped reference classifier, written from its config."""

from __future__ import annotations

from pathlib import Path

from models.metrics.reference.classifier import CARD_FILE, WEIGHTS_FILE, ReferenceConfig


def write_model_card(config: ReferenceConfig, out_dir: str | Path) -> Path:
    """Write the model card ``README.md`` from a config (data sources, licence, settings, measured metrics)."""
    out = Path(out_dir)
    td, tr, va = config.training_data, config.training, config.validation
    size_mb = (out / WEIGHTS_FILE).stat().st_size / 1e6 if (out / WEIGHTS_FILE).exists() else float("nan")
    lines = [
        f"# Reference pneumonia classifier, {config.resolution}x{config.resolution} (version {config.version})",
        "",
        "The yardstick of `models/metrics`: its penultimate embedding is the feature space of *domain FID* and",
        "precision/recall/density/coverage, and its pneumonia probability judges *label fidelity* of conditional",
        "samples. It is **not** a diagnostic device and must not be used on patients.",
        "",
        "## Model",
        f"- timm `{config.timm_name}`, `in_chans={config.in_chans}`, randomly initialised (`pretrained=False`),",
        f"  {tr.get('parameters', '?')} parameters, {tr.get('num_features', '?')}-d penultimate embedding,",
        f"  {len(config.label_names)} classes {list(config.label_names)}; positive label `{config.positive_label}`.",
        f"- Input: grey {config.resolution}x{config.resolution}, padded to square; "
        f"normalisation `(x/255 - {config.mean}) / {config.std}`.",
        f"- Weights: `{WEIGHTS_FILE}`, fp16 safetensors ({size_mb:.1f} MB); load with",
        "  `models.metrics.load_reference_classifier(dir)` (upcast to fp32).",
        "",
        "## Training data (real images only)",
        f"- {td.get('images')} images from `{td.get('folder')}` ({td.get('images_per_label')}), "
        f"{td.get('patients')} patients.",
        f"- Split: {td.get('split')}: {td.get('train_images')} train / {td.get('val_images')} validation images "
        f"({td.get('val_images_per_label')}).",
        "- Sources and licences (this model is a derived work):",
        *[f"  - {s}" for s in td.get("sources", [])],
        "",
        "## Training",
        f"- {tr.get('epochs')} epochs, batch {tr.get('batch_size')}, {tr.get('optimizer')}.",
        f"- Loss: {tr.get('loss')}.",
        f"- Augmentations: {tr.get('augmentations')}.",
        f"- Seed {tr.get('seed')}; device {tr.get('device')} ({tr.get('torch_threads')} torch threads, "
        f"torch {tr.get('torch')}); wall time {tr.get('wall_time_s')} s.",
        "",
        "## Measured validation metrics",
        f"On the patient-level validation split ({va.get('images')} images, {va.get('positives')} pneumonia), "
        f"{va.get('measured_on')}, threshold {va.get('threshold')}:",
        "",
        "| AUC | accuracy | balanced accuracy | sensitivity | specificity |",
        "|---|---|---|---|---|",
        f"| {va.get('auc')} | {va.get('accuracy')} | {va.get('balanced_accuracy')} | {va.get('sensitivity')} | "
        f"{va.get('specificity')} |",
        "",
        "The last epoch is shipped (no checkpoint selection on the validation split). The official Kermany test",
        "split is withheld from the project; these figures are on a split carved from the training data.",
        "",
        "## Limitations",
        "- Paediatric (1-5 years) anterior-posterior radiographs from one centre (Guangzhou); features and",
        "  probabilities are not calibrated for adult or other-site images.",
        f"- At {config.resolution} px fine texture is gone; the classifier sees global opacity patterns.",
        "- Several Kermany images share a patient; the split keeps each patient on one side.",
        "",
        "## Reproduce",
        "```",
        f"python -m models.metrics.reference --data ../shared/data/{td.get('folder')} --out {out.as_posix()} \\",
        f"    --model {config.timm_name} --resolution {config.resolution} --epochs {tr.get('epochs')} "
        f"--batch-size {tr.get('batch_size')} --seed {tr.get('seed')} --threads {tr.get('torch_threads')}",
        "```",
        "",
    ]
    path = out / CARD_FILE
    path.write_text("\n".join(lines))
    return path
