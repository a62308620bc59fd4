"""Audit any folder of images against a training folder: ``cxrsynth privacy-check``.

A hospital can check a synthetic dataset it did not make with this service: for every image, its
nearest training image in both spaces, both similarities, the thresholds and pass / fail, plus the
privacy report (JSON + PNG with the real training images beside the closest synthetic ones).

Thresholds come from the generator's ``privacy_calibration.json`` when ``generator_dir`` has one (and the
training folder matches its index); otherwise they are calibrated here from the training folder
(leave-one-out, skipping the same patient and exact duplicates) or from ``holdout`` real images.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.callbacks import OnStep, no_progress
from models.privacy.embedding import Embedder
from models.privacy.gate import MemorisationGate
from models.privacy.index import (
    DEFAULT_QUANTILE,
    PrivacyCalibration,
    PrivacyIndex,
    PrivacyIndexMissing,
    build_privacy_index,
    embedder_for_index,
    image_digests,
    load_privacy_index,
    load_training_folder,
)
from models.privacy.report import ImageVerdict, privacy_report, write_privacy_png

CHECK_BLOCK = 64


@dataclass(frozen=True)
class _Thresholds:
    """The index and calibration an audit checks against, and how rows of the index name training images."""

    index: PrivacyIndex
    calibration: PrivacyCalibration
    embedder: Embedder
    names: list[str]  # per index row: the training image's path relative to the training folder
    train_rows: list[int]  # per index row: its position among the loaded training images
    source: str


def _audit_geometry(generator_dir: str | Path | None, resolution: int | None) -> tuple[int, str]:
    """(resolution, aspect mode) of the comparison: the generator's when given, else ``resolution`` or 64 px."""
    aspect = "pad"
    if generator_dir is not None:
        from models.diffusion.export import read_generator_metadata

        gen_meta = read_generator_metadata(generator_dir)
        aspect = str(gen_meta.get("aspect_mode", "pad"))
        if resolution is not None and resolution != int(gen_meta["resolution"]):
            raise ValueError(f"--resolution {resolution} differs from the generator's {gen_meta['resolution']} px")
        resolution = int(gen_meta["resolution"])
    resolution = int(resolution or 64)
    if resolution < 16:
        raise ValueError(f"resolution must be at least 16 px, got {resolution}")
    return resolution, aspect


def _generator_thresholds(
    generator_dir: str | Path, train_data: str | Path, train: np.ndarray, rel_train: list[str], device: str
) -> _Thresholds | None:
    """The generator's own privacy index and calibration (``None`` without one); ``ValueError`` when the
    training folder does not hold every indexed image."""
    try:
        index, calibration = load_privacy_index(generator_dir)
    except PrivacyIndexMissing:
        return None
    by_sha = {bytes(d).hex(): name for d, name in zip(image_digests(train), rel_train, strict=True)}
    missing = [h for h in index.sha256 if h not in by_sha]
    if missing:
        raise ValueError(f"{train_data} does not hold the generator's training images ({len(missing)} of "
                         f"{len(index)} indexed images not found); give the folder it was trained on, or "
                         "--holdout to calibrate without the generator's index")
    names = [by_sha[h] for h in index.sha256]
    row_to_train = {h: i for i, h in enumerate(bytes(d).hex() for d in image_digests(train))}
    train_rows = [row_to_train[h] for h in index.sha256]
    embedder = embedder_for_index(index, device=device)
    return _Thresholds(index, calibration, embedder, names, train_rows, "generator privacy index")


def _calibrate_here(
    train: np.ndarray,
    labels: np.ndarray | None,
    patients: list[str],
    rel_train: list[str],
    root: Path,
    *,
    holdout: str | Path | None,
    resolution: int,
    aspect: str,
    embedding: str | None,
    quantile: float,
    device: str,
    on_step: OnStep,
) -> _Thresholds:
    """Index the training folder and calibrate its thresholds (leave-one-out, or against ``holdout``)."""
    from models.privacy.embedding import load_embedder

    hold = None if holdout is None else load_training_folder(holdout, resolution, aspect)[0]
    embedder = load_embedder(embedding, device=device)
    index, calibration = build_privacy_index(
        train, labels=labels, patient_ids=patients, holdout=hold, embedder=embedder, quantile=quantile,
        source=root.name, device=device,
        on_step=lambda k, n, m: on_step(k, n, f"calibrating: {m}"))
    return _Thresholds(index, calibration, embedder, rel_train, list(range(len(train))), "calibrated here")


def _check_queries(
    gate: MemorisationGate,
    queries: list[Any],
    qroot: Path,
    names: list[str],
    resolution: int,
    aspect: str,
    on_step: OnStep,
) -> tuple[list[ImageVerdict], list[dict[str, Any]]]:
    """Check the audited images in blocks: their verdicts and the report's per-image entries."""
    from models.data.folders import images_to_array

    verdicts: list[ImageVerdict] = []
    entries: list[dict[str, Any]] = []
    for s in range(0, len(queries), CHECK_BLOCK):
        block = queries[s : s + CHECK_BLOCK]
        imgs = images_to_array([r.path for r in block], resolution, aspect, threads=2)  # type: ignore[arg-type]
        res = gate.check(imgs)
        for k, rec in enumerate(block):
            rel = rec.path.relative_to(qroot).as_posix()
            v = ImageVerdict(position=s + k, file=rel, pixel=float(res.pixel_similarity[k]),
                             embedding=float(res.embedding_similarity[k]),
                             pixel_neighbour=int(res.pixel_neighbour[k]),
                             embedding_neighbour=int(res.embedding_neighbour[k]), passed=bool(res.passed[k]),
                             exact_copy=bool(res.exact_copy[k]), label=rec.label)
            verdicts.append(v)
            entries.append({"file": rel, "label": rec.label,
                            "nearest_training_image_pixel": names[v.pixel_neighbour],
                            "pixel_similarity": round(v.pixel, 6),
                            "nearest_training_image_embedding": names[v.embedding_neighbour],
                            "embedding_similarity": round(v.embedding, 6),
                            "exact_copy": v.exact_copy, "passed": v.passed})
        done = min(s + CHECK_BLOCK, len(queries))
        on_step(done, len(queries), f"checked {done} images")
    return verdicts, entries


@dataclass(frozen=True)
class _QueryImage:
    """Loads audited image ``pos`` for the report PNG."""

    queries: list[Any]
    resolution: int
    aspect: str

    def __call__(self, pos: int) -> np.ndarray:
        from models.data.folders import images_to_array

        return images_to_array([self.queries[pos].path], self.resolution, self.aspect,  # type: ignore[arg-type]
                               threads=1)[0]


def audit_folder(
    train_data: str | Path,
    images_dir: str | Path,
    *,
    generator_dir: str | Path | None = None,
    holdout: str | Path | None = None,
    resolution: int | None = None,
    quantile: float = DEFAULT_QUANTILE,
    embedding: str | None = None,
    png_path: str | Path | None = None,
    device: str = "auto",
    on_step: OnStep = no_progress,
) -> dict[str, Any]:
    """Check every image of ``images_dir`` against ``train_data``; returns the report (JSON-ready).

    Images are compared at ``resolution`` (default: the generator's, else 64 px) after the same
    aspect handling as training (``pad``). Raises ``FileNotFoundError`` / ``ValueError`` with a readable
    message for missing or empty folders, unreadable images, or a training folder that does not match
    the generator's privacy index.
    """
    from models.data.folders import list_image_folder

    t0 = time.time()
    resolution, aspect = _audit_geometry(generator_dir, resolution)
    queries = list_image_folder(images_dir)
    on_step(0, 0, f"loading {train_data}")
    train, labels, patients, train_paths = load_training_folder(train_data, resolution, aspect)
    root = Path(train_data)
    rel_train = [p.relative_to(root).as_posix() for p in train_paths]
    thresholds = None
    if generator_dir is not None and holdout is None:
        thresholds = _generator_thresholds(generator_dir, train_data, train, rel_train, device)
    if thresholds is None:
        thresholds = _calibrate_here(train, labels, patients, rel_train, root, holdout=holdout, resolution=resolution,
                                     aspect=aspect, embedding=embedding, quantile=quantile, device=device,
                                     on_step=on_step)
    index, calibration = thresholds.index, thresholds.calibration
    gate = MemorisationGate(index, calibration, thresholds.embedder, device="cpu")
    verdicts, entries = _check_queries(gate, queries, Path(images_dir), thresholds.names, resolution, aspect, on_step)
    names = thresholds.names
    report = privacy_report(verdicts, index, calibration, training_names=lambda row: names[row],
                            subject={"images": str(images_dir), "train_data": str(train_data),
                                     "generator": str(generator_dir) if generator_dir else None,
                                     "thresholds_from": thresholds.source, "resolution": resolution}, audit=True)
    report["calibration_full"] = calibration.to_json()
    report["seconds"] = round(time.time() - t0, 1)
    report["images"] = entries
    if png_path is not None:
        train_rows = thresholds.train_rows
        write_privacy_png(png_path, report, index, verdicts, _QueryImage(queries, resolution, aspect),
                          lambda row: train[train_rows[row]])
        report["png"] = str(png_path)
    return report
