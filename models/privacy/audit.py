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
from pathlib import Path
from typing import Any

import numpy as np

from models.callbacks import OnStep, no_progress
from models.privacy.gate import MemorisationGate
from models.privacy.index import (
    DEFAULT_QUANTILE,
    PrivacyIndexMissing,
    build_privacy_index,
    embedder_for_index,
    image_digests,
    load_privacy_index,
    load_training_folder,
)
from models.privacy.report import ImageVerdict, privacy_report, write_privacy_png

CHECK_BLOCK = 64


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
    from models.data.folders import images_to_array, list_image_folder

    t0 = time.time()
    aspect = "pad"
    gen_meta: dict[str, Any] = {}
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
    queries = list_image_folder(images_dir)
    on_step(0, 0, f"loading {train_data}")
    train, labels, patients, train_paths = load_training_folder(train_data, resolution, aspect)
    root = Path(train_data)
    rel_train = [p.relative_to(root).as_posix() for p in train_paths]
    index = calibration = None
    if generator_dir is not None and holdout is None:
        try:
            index, calibration = load_privacy_index(generator_dir)
        except PrivacyIndexMissing:
            index = None
    if index is not None and calibration is not None:
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
        source = "generator privacy index"
    else:
        from models.privacy.embedding import load_embedder

        hold = None if holdout is None else load_training_folder(holdout, resolution, aspect)[0]
        embedder = load_embedder(embedding, device=device)
        index, calibration = build_privacy_index(
            train, labels=labels, patient_ids=patients, holdout=hold, embedder=embedder, quantile=quantile,
            source=root.name, device=device,
            on_step=lambda k, n, m: on_step(k, n, f"calibrating: {m}"))
        names, train_rows = rel_train, list(range(len(train)))
        source = "calibrated here"
    gate = MemorisationGate(index, calibration, embedder, device="cpu")
    qroot = Path(images_dir)
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
    report = privacy_report(verdicts, index, calibration, training_names=lambda row: names[row],
                            subject={"images": str(images_dir), "train_data": str(train_data),
                                     "generator": str(generator_dir) if generator_dir else None,
                                     "thresholds_from": source, "resolution": resolution}, audit=True)
    report["calibration_full"] = calibration.to_json()
    report["seconds"] = round(time.time() - t0, 1)
    report["images"] = entries
    if png_path is not None:
        def synthetic_image(pos: int) -> np.ndarray:
            return images_to_array([queries[pos].path], resolution, aspect, threads=1)[0]  # type: ignore[arg-type]

        write_privacy_png(png_path, report, index, verdicts, synthetic_image, lambda row: train[train_rows[row]])
        report["png"] = str(png_path)
    return report
