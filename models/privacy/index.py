"""The privacy index of a generator (features of its training images) and its calibrated thresholds.

A generator directory gains two files:

``privacy_index.safetensors``
    Per training image: SHA-256 of its pixels, label, 14x14 pixel vector and embedding (both fp16,
    ~0.7 KB per image: 3.6 MB for Kermany's 5,016), plus the embedding space (training mean and PCA
    axes) and the real-vs-real similarity distribution of the calibration (for the report's
    histograms). Features, never images.
``privacy_calibration.json``
    The thresholds, the quantile they were taken at, what they were computed from, and a summary of
    the reference distribution; human-readable.

Calibration: a synthetic image is as suspicious as it is closer to a training image than real images
of *other* patients are. With held-out real images, the reference is each one's nearest-training-image
similarity. Without them (a generator is usually trained on every image), it is leave-one-out over the
training set: each training image against all others, skipping itself, its own patient's other images
(follow-ups look alike and are not memorisation) and exact duplicates (Kermany has 24 duplicate
groups; they would put 1.0 in the reference). Each threshold is the ``quantile`` (default 0.99) of
that distribution, per space; an image is rejected when it exceeds either. The index depends on the
training data and the embedding network only, not on the diffusion weights, so a retrained generator
on the same data can reuse it.

Built automatically when a generator is exported (patient ids from the training folder's file names;
for an in-memory array they are unknown and only duplicates are skipped, recorded as such);
:func:`build_for_generator` / ``cxrsynth privacy-index`` rebuilds it from the training folder, optionally
against held-out images.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from models.callbacks import OnStep, no_progress
from models.privacy.embedding import Embedder, load_embedder, load_embedder_for
from models.privacy.scoring import PIXEL_SIZE, EmbeddingSpace, crop_margin, pixel_vectors, score_images, shift_step

PRIVACY_INDEX = "privacy_index.safetensors"
PRIVACY_CALIBRATION = "privacy_calibration.json"
INDEX_FORMAT = "cxrsynth-privacy-index/1"
CALIBRATION_FORMAT = "cxrsynth-privacy-calibration/1"
DEFAULT_QUANTILE = 0.99
REPORT_QUANTILES = (0.5, 0.9, 0.95, 0.99, 0.995, 0.999, 1.0)
BUILD_BLOCK = 256  # images featurised / scored per step (progress granularity, bounded memory)


class PrivacyIndexMissing(FileNotFoundError):
    """The generator directory has no privacy index (built before the gate existed)."""


@dataclass(frozen=True)
class PrivacyCalibration:
    """Thresholds of the gate and where they came from (``privacy_calibration.json``)."""

    pixel_threshold: float
    embedding_threshold: float
    quantile: float
    reference: dict[str, Any]
    features: dict[str, Any]
    created_at: str = ""
    index_sha256: str = ""

    def to_json(self) -> dict[str, Any]:
        """The JSON object written to ``privacy_calibration.json``."""
        return {"format": CALIBRATION_FORMAT, "thresholds": {"pixel": self.pixel_threshold,
                                                              "embedding": self.embedding_threshold},
                "quantile": self.quantile, "reference": self.reference, "features": self.features,
                "created_at": self.created_at, "index_sha256": self.index_sha256,
                "rule": "reject when pixel similarity > thresholds.pixel or embedding similarity > "
                        "thresholds.embedding (nearest training image, see features)"}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PrivacyCalibration:
        """Parse ``privacy_calibration.json``; ``ValueError`` for another format."""
        if d.get("format") != CALIBRATION_FORMAT:
            raise ValueError(f"unsupported privacy calibration format {d.get('format')!r}")
        return cls(float(d["thresholds"]["pixel"]), float(d["thresholds"]["embedding"]), float(d["quantile"]),
                   dict(d["reference"]), dict(d["features"]), str(d.get("created_at", "")),
                   str(d.get("index_sha256", "")))


@dataclass
class PrivacyIndex:
    """Training-set features the gate searches, and the calibration's reference distribution."""

    sha256: list[str]
    labels: np.ndarray  # (N,) int64, -1 unlabelled
    pixel: np.ndarray  # (N, 196) float16
    embedding: np.ndarray  # (N, k) float16
    space: EmbeddingSpace
    resolution: int
    embedder_spec: dict[str, str]
    reference_pixel: np.ndarray  # (M,) float32, real-vs-train nearest-neighbour similarities
    reference_embedding: np.ndarray
    meta: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.sha256)


def feature_description(resolution: int, embedder_spec: dict[str, str], dims: int) -> dict[str, Any]:
    """What the two similarities are, for the calibration file and reports."""
    m = crop_margin(resolution)
    return {
        "resolution": resolution,
        "pixel": f"normalised cross-correlation of the centre crop ({resolution - 2 * m} px, margin {m}) "
                 f"area-averaged to {PIXEL_SIZE}x{PIXEL_SIZE}; max over shifts of up to +-{m} px (step "
                 f"{shift_step(resolution)}) and a horizontal flip",
        "embedding": f"cosine of {embedder_spec.get('kind')} '{embedder_spec.get('name')}' features, centred on the "
                     f"training mean, top {dims} principal axes; max over a horizontal flip",
        "embedding_network": dict(embedder_spec),
        "search": "exact nearest neighbour over every training image",
    }


def image_digests(images: np.ndarray) -> np.ndarray:
    """(N, 32) uint8 SHA-256 digests of each image's pixels (row-major uint8, as the training index)."""
    return np.stack([np.frombuffer(hashlib.sha256(np.ascontiguousarray(im).tobytes()).digest(), dtype=np.uint8)
                     for im in images])


def pair_exclusion_keys(sha: np.ndarray, groups: Sequence[str] | None) -> np.ndarray:
    """(N, 3) int keys of pairs to skip in leave-one-out: the image itself, its patient (itself when
    unknown), its exact-duplicate class (see :func:`models.privacy.search.nearest_neighbours`)."""
    n = len(sha)
    own = np.arange(n, dtype=np.int64)
    _, dup = np.unique(sha, axis=0, return_inverse=True)
    if groups is None:
        patient = own
    else:
        if len(groups) != n:
            raise ValueError(f"{len(groups)} patient ids for {n} images")
        _, patient = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    return np.stack([own, np.asarray(patient, dtype=np.int64).reshape(-1), np.asarray(dup).reshape(-1)], axis=1)


def _summary(values: np.ndarray) -> dict[str, float]:
    return {f"q{q:g}": round(float(np.quantile(values, q)), 5) for q in REPORT_QUANTILES} | {
        "mean": round(float(values.mean()), 5)}


def _check_index_inputs(images: np.ndarray, holdout: np.ndarray | None, quantile: float) -> None:
    if images.ndim != 3 or images.dtype != np.uint8 or images.shape[1] != images.shape[2]:
        raise ValueError(f"training images must be square uint8 (N, R, R), got {images.dtype} {images.shape}")
    if len(images) < 2:
        raise ValueError("the privacy index needs at least 2 training images")
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"quantile must be in (0, 1], got {quantile}")
    if holdout is not None and (holdout.ndim != 3 or holdout.shape[1:] != images.shape[1:] or len(holdout) == 0):
        raise ValueError(f"holdout images must be (M, {images.shape[1]}, {images.shape[2]}) uint8, got {holdout.shape}")


@dataclass(frozen=True)
class _ReferencePairs:
    """Which (reference image, training image) pairs calibration skips, in words and as group keys."""

    query_keys: np.ndarray  # per reference image
    train_keys: np.ndarray  # per training image
    exclusions: str
    source: str


def _reference_pairs(
    sha: np.ndarray, patient_ids: Sequence[str] | None, holdout: np.ndarray | None
) -> _ReferencePairs:
    """Leave-one-out skips the image itself, its exact duplicates and (when known) its patient; a holdout
    image skips only training images identical to it."""
    keys = pair_exclusion_keys(sha, patient_ids)
    if holdout is None:
        exclusions = ("the image itself, exact duplicates" + (", the same patient" if patient_ids is not None else
                      " (patient ids unknown: other images of the same patient count as real pairs, which can "
                      "only raise the thresholds)"))
        return _ReferencePairs(keys, keys, exclusions, "leave-one-out over the training images")
    n = len(sha)
    # Only exact duplicates are skipped: a held-out image shares a key with identical training images.
    _, inv = np.unique(np.concatenate([sha, image_digests(holdout)]), axis=0, return_inverse=True)
    inv = np.asarray(inv, dtype=np.int64).reshape(-1, 1)
    return _ReferencePairs(inv[n:], inv[:n], "training images identical to the held-out image",
                           "held-out real images against the training images")


def _reference_similarities(
    ref_images: np.ndarray,
    train_pix: np.ndarray,
    train_emb: np.ndarray,
    embedder: Embedder,
    space: EmbeddingSpace,
    pairs: _ReferencePairs,
    *,
    steps_before: int,
    total: int,
    on_step: OnStep,
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest admissible training neighbour of each reference image: (pixel, embedding) similarities, finite only."""
    ref_pix, ref_emb = [], []
    for k, s in enumerate(range(0, len(ref_images), BUILD_BLOCK)):
        block = ref_images[s : s + BUILD_BLOCK]
        qg, tg = pairs.query_keys[s : s + BUILD_BLOCK], pairs.train_keys
        sc = score_images(block, train_pix, train_emb, embedder, space, query_groups=qg, train_groups=tg)
        ref_pix.append(sc.pixel)
        ref_emb.append(sc.embedding)
        on_step(steps_before + k + 1, total,
                f"calibration {min(s + BUILD_BLOCK, len(ref_images))}/{len(ref_images)}")
    rp, re_ = np.concatenate(ref_pix), np.concatenate(ref_emb)
    finite = np.isfinite(rp) & np.isfinite(re_)  # an image with no admissible neighbour has none
    if finite.sum() < 2:
        raise ValueError("calibration needs at least 2 reference images with an admissible nearest neighbour")
    return rp[finite], re_[finite]


def build_privacy_index(
    images: np.ndarray,
    *,
    labels: np.ndarray | None = None,
    patient_ids: Sequence[str] | None = None,
    holdout: np.ndarray | None = None,
    embedder: Embedder | None = None,
    quantile: float = DEFAULT_QUANTILE,
    source: str = "",
    device: str = "auto",
    on_step: OnStep = no_progress,
) -> tuple[PrivacyIndex, PrivacyCalibration]:
    """Featurise uint8 ``(N, R, R)`` training images and calibrate the thresholds.

    ``holdout`` (``(M, R, R)`` real images not used in training) gives the reference distribution;
    without it the reference is leave-one-out over the training images, skipping the same patient
    (``patient_ids``, one per image, when known) and exact duplicates. Raises ``ValueError`` for bad
    shapes, fewer than 2 training images or a quantile outside (0, 1].
    """
    _check_index_inputs(images, holdout, quantile)
    t0 = time.time()
    embedder = embedder or load_embedder(device=device)
    n = len(images)
    blocks = range(0, n, BUILD_BLOCK)
    ref_images = images if holdout is None else holdout
    total = len(blocks) + len(range(0, len(ref_images), BUILD_BLOCK))
    feats = []
    for k, s in enumerate(blocks):
        feats.append(embedder(images[s : s + BUILD_BLOCK]))
        on_step(k + 1, total, f"features {min(s + BUILD_BLOCK, n)}/{n}")
    raw = torch.cat(feats)
    space = EmbeddingSpace.fit(raw)
    train_emb = space(raw).half().numpy()
    train_pix = pixel_vectors(images).half().numpy()
    sha = image_digests(images)
    pairs = _reference_pairs(sha, patient_ids, holdout)
    rp, re_ = _reference_similarities(ref_images, train_pix, train_emb, embedder, space, pairs,
                                      steps_before=len(blocks), total=total, on_step=on_step)
    resolution = int(images.shape[1])
    index = PrivacyIndex(
        sha256=[bytes(row).hex() for row in sha],
        labels=np.full(n, -1, dtype=np.int64) if labels is None else np.asarray(labels, dtype=np.int64),
        pixel=train_pix, embedding=train_emb, space=space, resolution=resolution,
        embedder_spec=dict(embedder.spec), reference_pixel=rp.astype(np.float32),
        reference_embedding=re_.astype(np.float32), meta={"source": source},
    )
    calibration = PrivacyCalibration(
        pixel_threshold=round(float(np.quantile(rp, quantile)), 6),
        embedding_threshold=round(float(np.quantile(re_, quantile)), 6),
        quantile=quantile,
        reference={"source": pairs.source, "data": source, "num_reference_images": len(rp),
                   "num_training_images": n, "excluded_pairs": pairs.exclusions,
                   "pixel": _summary(rp), "embedding": _summary(re_),
                   "seconds": round(time.time() - t0, 1)},
        features=feature_description(resolution, embedder.spec, int(train_emb.shape[1])),
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    return index, calibration


def save_privacy_index(generator_dir: str | Path, index: PrivacyIndex, calibration: PrivacyCalibration) -> Path:
    """Write ``privacy_index.safetensors`` and ``privacy_calibration.json`` into ``generator_dir``."""
    root = Path(generator_dir)
    root.mkdir(parents=True, exist_ok=True)
    path = root / PRIVACY_INDEX
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(
        {"sha256": np.stack([np.frombuffer(bytes.fromhex(h), dtype=np.uint8) for h in index.sha256]),
         "labels": index.labels.astype(np.int64), "pixel": index.pixel.astype(np.float16),
         "embedding": index.embedding.astype(np.float16),
         "embedding_mean": index.space.mean.numpy().astype(np.float32),
         "embedding_projection": index.space.projection.numpy().astype(np.float32),
         "reference_pixel": index.reference_pixel.astype(np.float32),
         "reference_embedding": index.reference_embedding.astype(np.float32)},
        str(tmp),
        metadata={"format": INDEX_FORMAT, "resolution": str(index.resolution),
                  "embedder": json.dumps(index.embedder_spec, sort_keys=True), **index.meta},
    )
    tmp.chmod(0o644)
    tmp.replace(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    cal = PrivacyCalibration(**{**calibration.__dict__, "index_sha256": digest})
    cal_path = root / PRIVACY_CALIBRATION
    cal_tmp = cal_path.with_name(f".{cal_path.name}.tmp")
    cal_tmp.write_text(json.dumps(cal.to_json(), indent=2) + "\n")
    cal_tmp.chmod(0o644)
    cal_tmp.replace(cal_path)
    return path


def has_privacy_index(generator_dir: str | Path) -> bool:
    """True when both privacy files are present."""
    root = Path(generator_dir)
    return (root / PRIVACY_INDEX).is_file() and (root / PRIVACY_CALIBRATION).is_file()


def load_privacy_index(generator_dir: str | Path) -> tuple[PrivacyIndex, PrivacyCalibration]:
    """Read both privacy files; :class:`PrivacyIndexMissing` when absent, ``ValueError`` when they disagree."""
    root = Path(generator_dir)
    if not has_privacy_index(root):
        raise PrivacyIndexMissing(f"{root} has no privacy index ({PRIVACY_INDEX} + {PRIVACY_CALIBRATION}); build it "
                                  "with `cxrsynth privacy-index --generator DIR --train-data DIR`")
    path = root / PRIVACY_INDEX
    calibration = PrivacyCalibration.from_json(json.loads((root / PRIVACY_CALIBRATION).read_text()))
    if calibration.index_sha256 and calibration.index_sha256 != hashlib.sha256(path.read_bytes()).hexdigest():
        raise ValueError(f"{root}: {PRIVACY_CALIBRATION} was computed for another {PRIVACY_INDEX}; rebuild both")
    t = load_file(str(path))
    with safe_open(str(path), framework="np") as fh:
        meta = dict(fh.metadata() or {})
    if meta.get("format") != INDEX_FORMAT:
        raise ValueError(f"{path}: unsupported privacy index format {meta.get('format')!r}")
    index = PrivacyIndex(
        sha256=[bytes(row).hex() for row in t["sha256"]], labels=t["labels"], pixel=t["pixel"],
        embedding=t["embedding"],
        space=EmbeddingSpace(torch.from_numpy(t["embedding_mean"]), torch.from_numpy(t["embedding_projection"])),
        resolution=int(meta["resolution"]), embedder_spec=json.loads(meta["embedder"]),
        reference_pixel=t["reference_pixel"], reference_embedding=t["reference_embedding"],
        meta={k: v for k, v in meta.items() if k not in ("format", "resolution", "embedder")},
    )
    return index, calibration


def load_training_folder(
    data_dir: str | Path, resolution: int, aspect_mode: str = "pad"
) -> tuple[np.ndarray, np.ndarray | None, list[str], list[Path]]:
    """Images of a training folder at the generator's resolution: (images, label ids, patient ids, paths).

    Label ids follow sorted label-folder names, as in training; ``None`` for an unlabelled folder.
    """
    from models.data.folders import images_to_array, list_image_folder

    records = list_image_folder(data_dir)
    images = images_to_array([r.path for r in records], resolution, aspect_mode, threads=2)  # type: ignore[arg-type]
    if records[0].label is None:
        labels = None
    else:
        names = sorted({r.label for r in records if r.label is not None})
        labels = np.array([names.index(r.label or "") for r in records], dtype=np.int64)
    return images, labels, [r.patient_id for r in records], [r.path for r in records]


def build_for_generator(
    generator_dir: str | Path,
    train_data: str | Path,
    *,
    holdout: str | Path | None = None,
    quantile: float = DEFAULT_QUANTILE,
    embedding: str | None = None,
    device: str = "auto",
    on_step: OnStep = no_progress,
) -> PrivacyCalibration:
    """(Re)build the privacy index + calibration of an existing generator from its training folder.

    The folder must hold exactly the generator's training images (checked against the SHA-256s of its
    ``training_index.safetensors`` when present). Patient ids come from the file names
    (:func:`models.data.folders.patient_id_from_name`). Returns the calibration written.
    """
    from models.diffusion.export import TRAINING_INDEX, load_training_index, read_generator_metadata

    root = Path(generator_dir)
    meta = read_generator_metadata(root)
    resolution, aspect = int(meta["resolution"]), str(meta.get("aspect_mode", "pad"))
    images, labels, patients, _ = load_training_folder(train_data, resolution, aspect)
    if (root / TRAINING_INDEX).is_file():
        expected = set(load_training_index(root).sha256)
        found = {bytes(r).hex() for r in image_digests(images)}
        if found != expected:
            raise ValueError(
                f"{train_data} does not hold this generator's training images: {len(found - expected)} image(s) "
                f"not in its training index, {len(expected - found)} training image(s) missing")
    hold = None
    if holdout is not None:
        hold = load_training_folder(holdout, resolution, aspect)[0]
    embedder = load_embedder(embedding, device=device)
    index, calibration = build_privacy_index(
        images, labels=labels, patient_ids=patients, holdout=hold, embedder=embedder, quantile=quantile,
        source=Path(train_data).name, device=device, on_step=on_step)
    save_privacy_index(root, index, calibration)
    return load_privacy_index(root)[1]


def embedder_for_index(index: PrivacyIndex, device: str = "auto") -> Embedder:
    """The network the index was built with (``EmbeddingMismatch`` if it changed)."""
    return load_embedder_for(index.embedder_spec, device=device)
