"""Generator report: domain FID, PRDC, within-label diversity and label fidelity, with a real-vs-real yardstick.

A number like "FID 12.3" means nothing alone. The real folder is split into two disjoint patient-level
halves: half A is the *reference* for both rows; the synthetic set and real half B are the two
*candidates*, subsampled (seeded) to the same size and the same label mix. The ``real_vs_real`` row is
then what a perfect generator would score at this sample size, in the same feature space.

:func:`generator_report` works on arrays; :func:`report_for_samples` takes a *sampler* callable and a real
folder, so it needs nothing from the diffusion code's internals (the CLI / worker pass a closure over
their pipeline).
"""

from __future__ import annotations

import json
import math
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from models.callbacks import OnStep, no_progress
from models.metrics.diversity import diversity_by_label, ms_ssim_settings
from models.metrics.fid import frechet_distance
from models.metrics.fidelity import label_fidelity_from_proba, positive_targets
from models.metrics.images import ImageBatch, check_images, check_labels, to_unit_float
from models.metrics.prdc import DEFAULT_K, precision_recall_density_coverage
from models.metrics.reference import ReferenceClassifier, load_reference_classifier

REPORT_VERSION = "1"
Labels = np.ndarray | torch.Tensor | Sequence[int]


class Sampler(Protocol):
    """Produces ``n`` synthetic images with a seed: ``(uint8 (n, H, W), labels (n,) or None)``."""

    def __call__(self, n: int, seed: int, on_step: OnStep) -> tuple[np.ndarray, np.ndarray | None]: ...


def _as_numpy(labels: Labels) -> np.ndarray:
    return labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)


def _split_real_halves(
    labels: np.ndarray | None, patient_ids: Sequence[str] | None, n: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint, label-stratified halves of the real set that never share a patient."""
    from models.data.folders import ImageRecord, patient_split

    pids = list(patient_ids) if patient_ids is not None else [f"image-{i}" for i in range(n)]
    if len(pids) != n:
        raise ValueError(f"real_patient_ids: expected {n}, got {len(pids)}")
    records = [ImageRecord(Path(), None if labels is None else str(int(labels[i])), pids[i]) for i in range(n)]
    a, b = patient_split(records, val_fraction=0.5, seed=seed)
    return np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)


def _matched_candidates(
    syn_labels: np.ndarray | None, b_labels: np.ndarray | None, n_syn: int, n_b: int, n_labels: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded equal-size subsamples of the synthetic set and real half B, with the same count per label."""
    rng = np.random.default_rng(seed)
    if syn_labels is None or b_labels is None:
        m = min(n_syn, n_b)
        return np.sort(rng.choice(n_syn, m, replace=False)), np.sort(rng.choice(n_b, m, replace=False))
    s_idx, b_idx = [], []
    for lab in range(n_labels):
        s_members, b_members = np.flatnonzero(syn_labels == lab), np.flatnonzero(b_labels == lab)
        m = min(len(s_members), len(b_members))
        s_idx.append(rng.choice(s_members, m, replace=False))
        b_idx.append(rng.choice(b_members, m, replace=False))
    return np.sort(np.concatenate(s_idx)).astype(np.int64), np.sort(np.concatenate(b_idx)).astype(np.int64)


def _set_metrics(cand_feats: torch.Tensor, ref_feats: torch.Tensor, k: int) -> dict[str, float | int | str | None]:
    """FID and PRDC of one candidate feature set against the reference; reasons instead of errors."""
    out: dict[str, float | int | str | None] = {"n": int(cand_feats.shape[0]), "n_reference": int(ref_feats.shape[0])}
    if cand_feats.shape[0] < 2 or ref_feats.shape[0] < 2:
        out["skipped"] = "FID needs at least 2 samples on each side"
        return out
    out["fid"] = round(frechet_distance(cand_feats, ref_feats), 4)
    if cand_feats.shape[0] > k and ref_feats.shape[0] > k:
        out.update({m: round(v, 4) for m, v in precision_recall_density_coverage(ref_feats, cand_feats, k).items()})
    else:
        out["prdc_skipped"] = f"PRDC needs more than k={k} samples on each side"
    return out


def _fidelity(
    probs: torch.Tensor, labels: np.ndarray | None, label_names: Sequence[str], positive: str
) -> dict[str, Any]:
    if labels is None:
        return {"skipped": "unconditional samples (no labels)"}
    try:
        return dict(label_fidelity_from_proba(probs, positive_targets(labels, label_names, positive)))
    except ValueError as exc:
        return {"skipped": str(exc)}


def _mean_probability_by_label(
    probs: torch.Tensor, labels: np.ndarray | None, label_names: Sequence[str]
) -> dict[str, float]:
    """Mean reference-classifier pneumonia probability per label (or over ``all`` when unlabelled)."""
    if labels is None:
        return {"all": round(float(probs.mean()), 4)}
    return {
        name: round(float(probs[torch.from_numpy(labels == i)].mean()), 4)
        for i, name in enumerate(label_names)
        if (labels == i).any()
    }


def _clean(value: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python, NaN/inf to None, tuples to lists."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_sample_grid(
    synthetic: ImageBatch,
    synthetic_labels: np.ndarray | None,
    real: ImageBatch,
    real_labels: np.ndarray | None,
    label_names: Sequence[str],
    path: str | Path,
    columns: int = 8,
    tile: int = 96,
) -> Path:
    """PNG grid: one row per label, ``columns`` synthetic images on the left, real ones on the right."""
    from PIL import Image, ImageDraw

    syn = (to_unit_float(check_images(synthetic, "synthetic")) * 255).round().to(torch.uint8)[:, 0].numpy()
    rea = (to_unit_float(check_images(real, "real")) * 255).round().to(torch.uint8)[:, 0].numpy()
    groups = list(enumerate(label_names)) if synthetic_labels is not None else [(-1, "all")]
    margin, gap, header = 110, 24, 22
    width = margin + 2 * columns * tile + gap
    canvas = Image.new("L", (width, header + len(groups) * tile), 255)
    draw = ImageDraw.Draw(canvas)
    draw.text((margin, 4), "synthetic", fill=0)
    draw.text((margin + columns * tile + gap, 4), "real", fill=0)
    for row, (index, name) in enumerate(groups):
        y = header + row * tile
        draw.text((6, y + tile // 2 - 6), name, fill=0)
        for side, (imgs, labs) in enumerate(((syn, synthetic_labels), (rea, real_labels))):
            members = np.arange(len(imgs)) if index < 0 or labs is None else np.flatnonzero(labs == index)
            x0 = margin + side * (columns * tile + gap)
            for c, i in enumerate(members[:columns]):
                im = Image.fromarray(imgs[i], mode="L").resize((tile, tile), Image.Resampling.BICUBIC)
                canvas.paste(im, (x0 + c * tile, y))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out


@dataclass(frozen=True)
class _CheckedInputs:
    """Validated inputs of :func:`generator_report`: image tensors, label indices (or ``None``), names."""

    syn: torch.Tensor
    syn_lab: np.ndarray | None
    real: torch.Tensor
    real_lab: np.ndarray | None
    names: list[str]


@dataclass(frozen=True)
class _ComparisonSets:
    """The three image sets compared: ``reference`` (real half A), ``synthetic`` and ``real_half_b``."""

    sets: dict[str, tuple[torch.Tensor, np.ndarray | None]]
    reference_half: int
    real_half_b: int
    candidates_per_row: int


@dataclass
class _Progress:
    """Counts report steps and passes each one to ``on_step`` (which may raise ``Canceled``)."""

    on_step: OnStep
    total: int
    step: int = 0

    def advance(self, message: str) -> None:
        self.step += 1
        self.on_step(self.step, self.total, message)


_ROWS = (("synthetic_vs_real", "synthetic"), ("real_vs_real", "real_half_b"))
_STEPS_PER_ROW = 3  # FID and PRDC, within-label MS-SSIM, label fidelity
_REPORT_NOTES = (
    "Both rows use real half A as the reference; candidates (synthetic, real half B) are seeded "
    "subsamples of equal size and label mix, so the real_vs_real row is the score of a perfect "
    "generator at this sample size.",
    "FID and PRDC are in the reference classifier's penultimate feature space (domain FID), not Inception.",
    "Diversity is mean pairwise MS-SSIM within a label: lower is more diverse; compare with real_vs_real.",
    "If the real folder is the reference classifier's training data, real_vs_real label fidelity is "
    "optimistic; the classifier's held-out figures are under reference_classifier.validation.",
)


def _check_inputs(
    synthetic_images: ImageBatch,
    synthetic_labels: Labels | None,
    real_images: ImageBatch,
    real_labels: Labels | None,
    label_names: Sequence[str],
    k: int,
    n_pairs: int,
) -> _CheckedInputs:
    """Images of equal size, labels that index ``label_names``, ``k`` and ``n_pairs`` >= 1; else ``ValueError``."""
    syn = check_images(synthetic_images, "synthetic_images")
    real = check_images(real_images, "real_images")
    if syn.shape[-2:] != real.shape[-2:]:
        raise ValueError(
            f"synthetic {tuple(syn.shape[-2:])} and real {tuple(real.shape[-2:])} images differ in size; "
            "load the real images at the synthetic resolution"
        )
    syn_lab = (
        None
        if synthetic_labels is None
        else check_labels(_as_numpy(synthetic_labels), syn.shape[0], "synthetic_labels")
    )
    if syn_lab is not None and real_labels is None:
        raise ValueError("real_labels are required when synthetic_labels are given")
    real_lab = None if real_labels is None else check_labels(_as_numpy(real_labels), real.shape[0], "real_labels")
    names = list(label_names)
    for lab, what in ((syn_lab, "synthetic_labels"), (real_lab, "real_labels")):
        if lab is not None and (lab.min() < 0 or lab.max() >= len(names)):
            raise ValueError(f"{what} must be indices into label_names {names}")
    if k < 1 or n_pairs < 1:
        raise ValueError("k and n_pairs must be >= 1")
    return _CheckedInputs(syn, syn_lab, real, real_lab, names)


def _comparison_sets(inputs: _CheckedInputs, real_patient_ids: Sequence[str] | None, seed: int) -> _ComparisonSets:
    """Split the real images into halves A / B, then match synthetic and half-B candidates by size and labels."""
    syn, syn_lab, real, real_lab = inputs.syn, inputs.syn_lab, inputs.real, inputs.real_lab
    a_idx, b_idx = _split_real_halves(real_lab, real_patient_ids, int(real.shape[0]), seed)
    if syn_lab is None:
        real_lab = None  # unconditional: real labels only stratified the halves; compare label-blind
    b_lab = None if real_lab is None else real_lab[b_idx]
    s_pick, b_pick = _matched_candidates(syn_lab, b_lab, int(syn.shape[0]), len(b_idx), len(inputs.names), seed)
    if len(s_pick) < 2:
        raise ValueError("fewer than 2 synthetic images share a label with the real half; nothing to compare")
    b_pick = b_idx[b_pick]
    sets = {
        "reference": (real[torch.from_numpy(a_idx)], None if real_lab is None else real_lab[a_idx]),
        "synthetic": (syn[torch.from_numpy(s_pick)], None if syn_lab is None else syn_lab[s_pick]),
        "real_half_b": (real[torch.from_numpy(b_pick)], None if real_lab is None else real_lab[b_pick]),
    }
    return _ComparisonSets(sets, len(a_idx), len(b_idx), len(s_pick))


def _feature_chunk(batch_size: int) -> int:
    """Images per ``features_and_proba`` call (one progress step each)."""
    return max(1, batch_size) * 4


def _count_steps(sets: _ComparisonSets, batch_size: int) -> int:
    """Feature chunks of every set, three steps per row, one for writing the report."""
    chunk = _feature_chunk(batch_size)
    n_chunks = sum(math.ceil(int(imgs.shape[0]) / chunk) for imgs, _ in sets.sets.values())
    return n_chunks + len(_ROWS) * _STEPS_PER_ROW + 1


def _extract_features(
    clf: ReferenceClassifier, sets: _ComparisonSets, batch_size: int, progress: _Progress
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Reference-classifier embeddings and pneumonia probabilities of every set, in chunks."""
    chunk = _feature_chunk(batch_size)
    feats: dict[str, torch.Tensor] = {}
    probs: dict[str, torch.Tensor] = {}
    for name, (imgs, _) in sets.sets.items():
        f_parts, p_parts = [], []
        for start in range(0, int(imgs.shape[0]), chunk):
            f, p = clf.features_and_proba(imgs[start : start + chunk], batch_size=batch_size)
            f_parts.append(f)
            p_parts.append(p)
            progress.advance(f"reference-classifier features: {name} {start + len(f)}/{imgs.shape[0]}")
        feats[name], probs[name] = torch.cat(f_parts), torch.cat(p_parts)
    return feats, probs


def _row_metrics(
    row: str,
    cand: str,
    sets: _ComparisonSets,
    feats: dict[str, torch.Tensor],
    probs: dict[str, torch.Tensor],
    names: list[str],
    positive_label: str,
    *,
    k: int,
    n_pairs: int,
    seed: int,
    progress: _Progress,
) -> dict[str, Any]:
    """One report row: candidate set ``cand`` against the reference (FID/PRDC, diversity, label fidelity)."""
    ref_lab = sets.sets["reference"][1]
    cand_imgs, cand_lab = sets.sets[cand]
    metrics: dict[str, Any] = dict(_set_metrics(feats[cand], feats["reference"], k))
    if cand_lab is not None and ref_lab is not None:
        metrics["per_label"] = {
            lab_name: _set_metrics(feats[cand][cand_lab == i], feats["reference"][ref_lab == i], k)
            for i, lab_name in enumerate(names)
        }
    progress.advance(f"{row}: FID and PRDC")
    metrics["diversity"] = diversity_by_label(cand_imgs, cand_lab, names, n_pairs=n_pairs, seed=seed)
    progress.advance(f"{row}: within-label MS-SSIM")
    metrics["label_fidelity"] = _fidelity(probs[cand], cand_lab, names, positive_label)
    metrics["mean_pneumonia_probability"] = _mean_probability_by_label(probs[cand], cand_lab, names)
    progress.advance(f"{row}: label fidelity")
    return metrics


def _counts(inputs: _CheckedInputs, sets: _ComparisonSets) -> dict[str, Any]:
    syn_lab = sets.sets["synthetic"][1]
    return {
        "synthetic_given": int(inputs.syn.shape[0]),
        "real_given": int(inputs.real.shape[0]),
        "reference_half": sets.reference_half,
        "real_half_b": sets.real_half_b,
        "candidates_per_row": sets.candidates_per_row,
        "candidates_per_label": (
            {n: int((syn_lab == i).sum()) for i, n in enumerate(inputs.names)} if syn_lab is not None else None
        ),
    }


def _fid_ratio(rows: dict[str, dict[str, Any]]) -> float | None:
    """Synthetic FID over the real-vs-real FID (``None`` when either is missing or the yardstick is 0)."""
    syn_fid, real_fid = rows["synthetic_vs_real"].get("fid"), rows["real_vs_real"].get("fid")
    if isinstance(syn_fid, float) and isinstance(real_fid, float) and real_fid > 0:
        return round(syn_fid / real_fid, 3)
    return None


def _classifier_info(clf: ReferenceClassifier) -> dict[str, Any]:
    return {
        "timm_name": clf.config.timm_name,
        "resolution": clf.config.resolution,
        "version": clf.config.version,
        "num_features": clf.num_features,
        "training_data": {key: clf.config.training_data.get(key) for key in ("folder", "images", "patients")},
        "validation": clf.config.validation,
    }


def _settings(k: int, n_pairs: int, seed: int, image_size: int, patient_level: bool) -> dict[str, Any]:
    return {
        "k": k,
        "n_pairs": n_pairs,
        "seed": seed,
        "ms_ssim": ms_ssim_settings(image_size),
        "real_split": "two disjoint label-stratified halves; "
        + ("patient-level" if patient_level else "image-level (no patient ids given)"),
    }


def _machine(clf: ReferenceClassifier) -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "device": str(clf.device),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def _write_json(report: dict[str, Any], json_path: str | Path) -> None:
    out = Path(json_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")


def generator_report(
    synthetic_images: ImageBatch,
    synthetic_labels: Labels | None,
    real_images: ImageBatch,
    real_labels: Labels | None,
    label_names: Sequence[str],
    *,
    real_patient_ids: Sequence[str] | None = None,
    classifier: ReferenceClassifier | None = None,
    k: int = DEFAULT_K,
    n_pairs: int = 500,
    seed: int = 0,
    batch_size: int = 256,
    json_path: str | Path | None = None,
    grid_path: str | Path | None = None,
    grid_columns: int = 8,
    extra: dict[str, Any] | None = None,
    on_step: OnStep = no_progress,
) -> dict[str, Any]:
    """Quality report of synthetic images against real ones, with a real-vs-real row as the yardstick.

    ``synthetic_labels`` and ``real_labels`` are indices into ``label_names`` (``synthetic_labels=None``
    for an unconditional generator). ``real_patient_ids`` keeps each patient in one real half (without
    it every image counts as its own patient). Rows: ``synthetic_vs_real`` and ``real_vs_real``, each
    with ``fid``, ``precision``, ``recall``, ``density``, ``coverage`` (overall and ``per_label``),
    ``diversity`` (within-label MS-SSIM) and ``label_fidelity``. Writes JSON / a PNG grid when paths are
    given. ``on_step`` may raise ``Canceled`` between steps.
    """
    t_start = time.time()
    inputs = _check_inputs(synthetic_images, synthetic_labels, real_images, real_labels, label_names, k, n_pairs)
    names = inputs.names
    clf = classifier if classifier is not None else load_reference_classifier()
    sets = _comparison_sets(inputs, real_patient_ids, seed)
    progress = _Progress(on_step, _count_steps(sets, batch_size))
    feats, probs = _extract_features(clf, sets, batch_size, progress)
    rows = {
        row: _row_metrics(row, cand, sets, feats, probs, names, clf.config.positive_label,
                          k=k, n_pairs=n_pairs, seed=seed, progress=progress)
        for row, cand in _ROWS
    }
    report: dict[str, Any] = {
        "report_version": REPORT_VERSION,
        "label_names": names,
        "conditional": inputs.syn_lab is not None,
        "counts": _counts(inputs, sets),
        "rows": rows,
        "fid_ratio_synthetic_to_real": _fid_ratio(rows),
        "reference_classifier": _classifier_info(clf),
        "settings": _settings(k, n_pairs, seed, int(inputs.syn.shape[-1]), real_patient_ids is not None),
        "notes": list(_REPORT_NOTES),
        "machine": _machine(clf),
        "wall_time_s": None,
        **(extra or {}),
    }
    if grid_path is not None:
        (syn_imgs, syn_lab), (b_imgs, b_lab) = sets.sets["synthetic"], sets.sets["real_half_b"]
        write_sample_grid(syn_imgs, syn_lab, b_imgs, b_lab, names, grid_path, grid_columns)
        report["grid_png"] = str(grid_path)
    progress.advance("report written")
    report["wall_time_s"] = round(time.time() - t_start, 1)
    report = _clean(report)
    if json_path is not None:
        _write_json(report, json_path)
    return report


def report_for_samples(
    sampler: Sampler,
    real_dir: str | Path,
    n: int = 1000,
    *,
    label_names: Sequence[str] | None = None,
    classifier_dir: str | Path | None = None,
    device: str = "auto",
    seed: int = 0,
    k: int = DEFAULT_K,
    n_pairs: int = 500,
    json_path: str | Path | None = None,
    grid_path: str | Path | None = None,
    extra: dict[str, Any] | None = None,
    on_step: OnStep = no_progress,
) -> dict[str, Any]:
    """Generate ``n`` images with ``sampler(n, seed, on_step)`` and report them against a real folder.

    ``label_names`` name the sampler's label indices (default: the real folder's label folders,
    lower-cased and sorted, e.g. ``["normal", "pneumonia"]``); matching is case-insensitive. Real images
    are read at the synthetic resolution with patient ids from their file names. Progress comes in two
    stages: ``generate: ...`` from the sampler, then ``evaluate: ...``.
    """
    from models.data.folders import images_to_array, list_image_folder

    if n < 2:
        raise ValueError(f"n must be >= 2, got {n}")
    records = list_image_folder(real_dir)
    folder_labels = sorted({r.label for r in records if r.label is not None})
    names = [s.lower() for s in (label_names if label_names is not None else folder_labels)]

    def generate_step(step: int, total: int, message: str) -> None:
        on_step(step, total, f"generate: {message}")

    images, labels = sampler(n, seed, generate_step)
    syn = check_images(images, "sampler images")
    if labels is not None:
        missing = [nm for nm in names if nm not in folder_labels]
        if missing:
            raise ValueError(f"labels {missing} have no folder in {real_dir} (folders: {folder_labels})")
        records = [r for r in records if r.label in names]
    else:
        names = list(folder_labels)  # unconditional: folder labels only stratify the real halves
    real_labels = np.array([names.index(r.label or "") for r in records], dtype=np.int64) if names else None
    size = int(syn.shape[-1])
    real = images_to_array([r.path for r in records], size, mode="pad", threads=2)

    def evaluate_step(step: int, total: int, message: str) -> None:
        on_step(step, total, f"evaluate: {message}")

    clf = load_reference_classifier(classifier_dir, device=device)
    return generator_report(
        syn,
        labels,
        real,
        real_labels,
        names,
        real_patient_ids=[r.patient_id for r in records],
        classifier=clf,
        k=k,
        n_pairs=n_pairs,
        seed=seed,
        json_path=json_path,
        grid_path=grid_path,
        extra={"real_dir": str(real_dir), "n_requested": n, **(extra or {})},
        on_step=evaluate_step,
    )
