"""Privacy report of a synthetic dataset (or an audited folder): JSON summary and a PNG.

The JSON says what was compared, the thresholds and where they came from, how many candidates the gate
rejected and replaced, the memorisation rate before and after the gate, and the similarity
distributions synthetic-vs-train beside real-vs-train. The PNG shows those histograms with the
thresholds, and the 16 released images closest to a training image beside that training image.

Definitions (also written into the JSON):

* memorisation rate before the gate: share of first-attempt samples the gate rejected (above a
  threshold or byte-identical to a training image);
* memorisation rate after the gate: share of released images still above a threshold (0 when the
  gate passed);
* closeness percentile: share of real (reference) images farther from their nearest training image
  than this image is from its own, the larger of the two spaces; images are ranked by it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from models.privacy.index import REPORT_QUANTILES, PrivacyCalibration, PrivacyIndex

REPORT_FORMAT = "cxrsynth-privacy-report/1"
CLOSEST_PAIRS = 16
HIST_BINS = 60


@dataclass
class ImageVerdict:
    """The gate's verdict on one released image and the candidates it replaced."""

    position: int  # index of the image in its dataset / folder
    file: str
    pixel: float
    embedding: float
    pixel_neighbour: int  # privacy-index row of the nearest training image (pixel space)
    embedding_neighbour: int
    passed: bool
    exact_copy: bool = False
    label: str | None = None
    rejected: list[dict[str, Any]] = field(default_factory=list)  # one per rejected earlier candidate

    @property
    def attempts(self) -> int:
        """Candidates generated for this image (1 = the first one was released)."""
        return len(self.rejected) + 1


def _summary(values: np.ndarray) -> dict[str, float] | None:
    if len(values) == 0:
        return None
    return {f"q{q:g}": round(float(np.quantile(values, q)), 5) for q in REPORT_QUANTILES} | {
        "mean": round(float(values.mean()), 5), "n": len(values)}


def _percentile(reference: np.ndarray, values: np.ndarray) -> np.ndarray:
    ref = np.sort(reference)
    return np.searchsorted(ref, values, side="left") / max(1, len(ref))


def _histogram(synthetic: np.ndarray, real: np.ndarray, threshold: float) -> dict[str, Any]:
    both = np.concatenate([synthetic, real, [threshold]])
    # Cosines of identical vectors can exceed 1 by a rounding error: keep them inside the last bin.
    lo, hi = float(np.floor(both.min() * 100) / 100), float(np.ceil(both.max() * 100) / 100 + 0.005)
    edges = np.linspace(lo, hi, HIST_BINS + 1)
    return {"edges": [round(float(e), 5) for e in edges],
            "synthetic_vs_train": np.histogram(synthetic, edges)[0].tolist(),
            "real_vs_train": np.histogram(real, edges)[0].tolist()}


def closeness(verdicts: Sequence[ImageVerdict], index: PrivacyIndex) -> np.ndarray:
    """Closeness percentile of each verdict (see the module docstring)."""
    pix = np.array([v.pixel for v in verdicts], dtype=np.float64)
    emb = np.array([v.embedding for v in verdicts], dtype=np.float64)
    return np.maximum(_percentile(index.reference_pixel, pix), _percentile(index.reference_embedding, emb))


def closest(verdicts: Sequence[ImageVerdict], index: PrivacyIndex, k: int = CLOSEST_PAIRS) -> list[int]:
    """Positions (into ``verdicts``) of the ``k`` images closest to a training image, closest first."""
    if not verdicts:
        return []
    pct = closeness(verdicts, index)
    pix = np.array([v.pixel for v in verdicts])
    order = np.lexsort((-pix, -pct))  # by percentile, ties by pixel similarity
    return [int(i) for i in order[:k]]


def privacy_report(
    verdicts: Sequence[ImageVerdict],
    index: PrivacyIndex,
    calibration: PrivacyCalibration,
    *,
    max_attempts: int | None = None,
    subject: dict[str, Any] | None = None,
    training_names: Callable[[int], str] | None = None,
    audit: bool = False,
) -> dict[str, Any]:
    """The privacy report (JSON-ready dict) of released images and the candidates they replaced.

    ``training_names(row)`` names a training image in the closest-pairs list (default: the SHA-256 of
    its pixels, which its owner can look up; never the pixels). ``audit=True`` reports on a folder
    checked after the fact (no candidates, no replacements): counts and rate of flagged images only.
    """
    n = len(verdicts)
    if n == 0:
        raise ValueError("no images to report on")
    pix = np.array([v.pixel for v in verdicts], dtype=np.float64)
    emb = np.array([v.embedding for v in verdicts], dtype=np.float64)
    rejected = [r for v in verdicts for r in v.rejected]
    candidates = n + len(rejected)
    first_rejected = sum(1 for v in verdicts if v.rejected or not v.passed)
    failed = sum(1 for v in verdicts if not v.passed)
    all_pix = np.concatenate([pix, [r["nn_pixel_similarity"] for r in rejected]])
    all_emb = np.concatenate([emb, [r["nn_embedding_similarity"] for r in rejected]])
    name = training_names or (lambda row: index.sha256[row])
    pct = closeness(verdicts, index)
    pairs = []
    for i in closest(verdicts, index):
        v = verdicts[i]
        pairs.append({"file": v.file, "position": v.position, "label": v.label,
                      "pixel_similarity": round(v.pixel, 5), "embedding_similarity": round(v.embedding, 5),
                      "closeness_percentile": round(float(pct[i]) * 100, 2), "passed": v.passed,
                      "nearest_training_image": name(v.pixel_neighbour),
                      "nearest_training_image_embedding": name(v.embedding_neighbour)})
    thresholds = {"pixel": calibration.pixel_threshold, "embedding": calibration.embedding_threshold}
    exact = sum(1 for v in verdicts if v.exact_copy) + sum(1 for r in rejected if r.get("exact_copy"))
    if audit:
        counts: dict[str, Any] = {"images": n, "flagged": failed, "exact_copies": exact}
        rates: dict[str, Any] = {"flagged": round(failed / n, 6),
                                 "definition": "share of the audited images above a threshold or identical to a "
                                               "training image"}
    else:
        counts = {"images": n, "candidates": candidates, "rejected_candidates": len(rejected) + failed,
                  "replaced_images": sum(1 for v in verdicts if v.rejected), "failed_images": failed,
                  "exact_copies": exact, **({"max_attempts": max_attempts} if max_attempts is not None else {})}
        rates = {"before_gate": round(first_rejected / n, 6), "after_gate": round(failed / n, 6),
                 "definition": "before: share of first-attempt samples rejected by the gate; after: share of "
                               "released images above a threshold"}
    return {
        "format": REPORT_FORMAT,
        "kind": "audit" if audit else "dataset",
        "status": "passed" if failed == 0 else "failed",
        **({"subject": subject} if subject else {}),
        "thresholds": thresholds,
        "quantile": calibration.quantile,
        "rule": "an image is rejected when its nearest training image is closer than thresholds.pixel (pixel "
                "space) or thresholds.embedding (embedding space), or when its pixels equal a training image's; "
                "the thresholds are the quantile of real images' similarity to the training set (calibration)",
        "calibration": {k: calibration.reference.get(k) for k in ("source", "data", "num_reference_images",
                                                                 "num_training_images", "excluded_pairs")}
        | {"created_at": calibration.created_at},
        "features": calibration.features,
        "counts": counts,
        **({} if audit else {"rejection_rate": round((len(rejected) + failed) / candidates, 6)}),
        "memorisation_rate": rates,
        "similarity": {
            "synthetic_vs_train": {"pixel": _summary(pix), "embedding": _summary(emb)},
            "candidates_vs_train": {"pixel": _summary(all_pix), "embedding": _summary(all_emb)},
            "real_vs_train": {"pixel": _summary(index.reference_pixel),
                              "embedding": _summary(index.reference_embedding)},
        },
        "histograms": {"pixel": _histogram(pix, index.reference_pixel, thresholds["pixel"]),
                       "embedding": _histogram(emb, index.reference_embedding, thresholds["embedding"])},
        "closest_pairs": pairs,
    }


def summary_of(report: dict[str, Any]) -> dict[str, Any]:
    """The short form kept on a dataset row / card: status, thresholds, counts, rates, calibration."""
    keys = ("format", "kind", "status", "thresholds", "quantile", "counts", "rejection_rate", "memorisation_rate",
            "calibration")
    return {k: report[k] for k in keys if k in report}


def index_thumbnail(index: PrivacyIndex, row: int) -> np.ndarray:
    """The 14x14 pixel vector of a training image as a uint8 image (min-max scaled): what the gate saw."""
    v = index.pixel[row].astype(np.float32)
    side = math.isqrt(v.size)
    v = (v - v.min()) / max(float(v.max() - v.min()), 1e-6)
    return (v.reshape(side, side) * 255).round().astype(np.uint8)


def write_privacy_png(
    path: str | Path,
    report: dict[str, Any],
    index: PrivacyIndex,
    verdicts: Sequence[ImageVerdict],
    synthetic_image: Callable[[int], np.ndarray],
    training_image: Callable[[int], np.ndarray] | None = None,
) -> Path:
    """Histograms (synthetic-vs-train beside real-vs-train, thresholds) and the closest pairs.

    ``synthetic_image(position)`` returns a released image; ``training_image(row)`` a training image
    at full resolution when the caller has the training data, else the pair shows the training image's
    14x14 index vector (what the gate compared; the index holds no images).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = closest(verdicts, index)
    ncols_pairs = 4
    rows = max(1, int(np.ceil(len(order) / ncols_pairs)))
    fig = plt.figure(figsize=(13, 3.4 + 1.9 * rows), dpi=100)
    gs = fig.add_gridspec(1 + rows, 2 * ncols_pairs, height_ratios=[2.2] + [1.0] * rows, hspace=0.45, wspace=0.08,
                          left=0.05, right=0.98, top=1 - 0.45 / (3.4 + 1.9 * rows), bottom=0.02)
    pix_pct = _percentile(index.reference_pixel, np.array([v.pixel for v in verdicts]))
    emb_pct = _percentile(index.reference_embedding, np.array([v.embedding for v in verdicts]))
    for k, space in enumerate(("pixel", "embedding")):
        ax = fig.add_subplot(gs[0, 4 * k + k : 4 * k + 4 - (1 - k)])
        h = report["histograms"][space]
        edges = np.asarray(h["edges"])
        ours = "checked images vs train" if report.get("kind") == "audit" else "synthetic vs train (released)"
        for key, colour, lab in (("real_vs_train", "tab:blue", "real vs train (reference)"),
                                 ("synthetic_vs_train", "tab:orange", ours)):
            counts = np.asarray(h[key], dtype=float)
            dens = counts / max(counts.sum(), 1.0) / np.diff(edges)
            ax.stairs(dens, edges, fill=True, alpha=0.45, color=colour, label=f"{lab}, n={int(counts.sum())}")
        thr = report["thresholds"][space]
        ax.axvline(thr, color="crimson", lw=1.5, ls="--", label=f"threshold {thr:.4f} (q={report['quantile']})")
        ax.set_xlabel(f"{space} similarity to nearest training image")
        ax.set_ylabel("density")
        ax.legend(fontsize=7, loc="upper left")
    c, m = report["counts"], report["memorisation_rate"]
    if report.get("kind") == "audit":
        title = (f"Privacy audit: {report['status'].upper()}  |  {c['images']} images, {c['flagged']} flagged "
                 f"({m['flagged']:.2%}), {c['exact_copies']} exact copies")
    else:
        title = (f"Privacy gate: {report['status'].upper()}  |  {c['images']} images, {c['rejected_candidates']} of "
                 f"{c['candidates']} candidates rejected, {c['replaced_images']} replaced, {c['failed_images']} "
                 f"failed  |  memorisation rate {m['before_gate']:.2%} before, {m['after_gate']:.2%} after")
    fig.suptitle(title, fontsize=10)
    for j, i in enumerate(order):
        v = verdicts[i]
        r, col = divmod(j, ncols_pairs)
        a1 = fig.add_subplot(gs[1 + r, 2 * col])
        a2 = fig.add_subplot(gs[1 + r, 2 * col + 1])
        # The nearest training image in the space where this image is closest (relative to real pairs).
        by_pixel = pix_pct[i] >= emb_pct[i]
        row = v.pixel_neighbour if by_pixel else v.embedding_neighbour
        a1.imshow(synthetic_image(v.position), cmap="gray", vmin=0, vmax=255)
        if training_image is not None:
            a2.imshow(training_image(row), cmap="gray", vmin=0, vmax=255)
            right = "nearest training"
        else:
            a2.imshow(index_thumbnail(index, row), cmap="gray", vmin=0, vmax=255)
            right = "nearest training 14x14"
        a1.set_title(f"{'' if v.passed else 'FAIL '}px {v.pixel:.3f} emb {v.embedding:.3f}", fontsize=7)
        a2.set_title(f"{right} ({'px' if by_pixel else 'emb'}), {max(pix_pct[i], emb_pct[i]) * 100:.1f} pct",
                     fontsize=7)
        for a in (a1, a2):
            a.set_xticks([])
            a.set_yticks([])
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    plt.close(fig)
    return out
