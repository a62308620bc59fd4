"""Validation splits and label-fraction subsets, carved from the TRAINING folder only.

The validation split is patient-level (no patient on both sides: images of one patient are
near-duplicates, and leaking them would make model selection optimistic), label-stratified and
seeded (``models.data.folders.patient_split``). It does not depend on the label fraction, so every
arm of a label-efficiency curve is selected on the same validation images. The label fraction then
subsamples the training side, stratified by label and seeded. The test folder is never an input here.

:func:`hold_out_groups` sets whole patient groups aside first (e.g. the ``NORMAL2-IM-*`` acquisition
batch): a shifted set that is neither trained on nor used for model selection, scored on its own.
"""

from __future__ import annotations

import fnmatch
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, overload

import numpy as np

from models.data.folders import ImageRecord, patient_split

T = TypeVar("T")


@dataclass(frozen=True)
class TrainValSplit(Generic[T]):
    """Training items (after the label fraction) and validation items, both from the training folder."""

    train: list[T]
    val: list[T]
    train_pool: int  # training-side items before the label fraction

    def summary(self, label_of: Any = None) -> dict[str, Any]:
        """Sizes (and label counts when ``label_of(item)`` is given) for reports."""
        out: dict[str, Any] = {"train": len(self.train), "val": len(self.val), "train_pool": self.train_pool}
        if label_of is not None:
            out["train_counts"] = dict(sorted(Counter(label_of(x) for x in self.train).items()))
            out["val_counts"] = dict(sorted(Counter(label_of(x) for x in self.val).items()))
        return out


def stratified_subsample(labels: Sequence[Any], fraction: float, seed: int = 0) -> list[int]:
    """Seeded, label-stratified subset of ``round(fraction * n_c)`` (at least 1) items per label.

    Returns sorted indices. ``fraction == 1`` returns everything.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label_fraction must be in (0, 1], got {fraction}")
    n = len(labels)
    if fraction == 1.0:
        return list(range(n))
    rng = np.random.default_rng(seed)
    arr = np.asarray([str(x) for x in labels])
    keep: list[int] = []
    for lab in sorted(set(arr.tolist())):
        members = np.flatnonzero(arr == lab)
        k = max(1, round(fraction * len(members)))
        keep.extend(int(i) for i in rng.choice(members, size=k, replace=False))
    return sorted(keep)


@overload
def validation_split(
    records: Sequence[ImageRecord],
    items: None = None,
    *,
    val_fraction: float = 0.2,
    label_fraction: float = 1.0,
    seed: int = 0,
) -> TrainValSplit[ImageRecord]: ...


@overload
def validation_split(
    records: Sequence[ImageRecord],
    items: Sequence[T],
    *,
    val_fraction: float = 0.2,
    label_fraction: float = 1.0,
    seed: int = 0,
) -> TrainValSplit[T]: ...


def validation_split(
    records: Sequence[ImageRecord],
    items: Sequence[Any] | None = None,
    *,
    val_fraction: float = 0.2,
    label_fraction: float = 1.0,
    seed: int = 0,
) -> TrainValSplit[Any]:
    """Patient-level, stratified, seeded train/validation split, then the label-fraction subset.

    ``records`` carry labels and patient ids; ``items`` (default: the records) are what is returned,
    aligned with ``records`` (e.g. image/mask pairs).
    """
    if len(records) < 2:
        raise ValueError("need at least 2 training images to carve a validation split")
    if len({r.patient_id for r in records}) < 2:
        raise ValueError("all training images belong to one patient: cannot carve a patient-level validation split")
    seq: Sequence[Any] = records if items is None else items
    if len(seq) != len(records):
        raise ValueError("items must align with records")
    train_idx, val_idx = patient_split(records, val_fraction=val_fraction, seed=seed)
    sub = stratified_subsample([records[i].label or "" for i in train_idx], label_fraction, seed)
    train = [seq[train_idx[j]] for j in sub]
    return TrainValSplit(train, [seq[i] for i in val_idx], len(train_idx))


def hold_out_groups(
    records: Sequence[ImageRecord], patterns: Sequence[str]
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Split ``records`` into (kept, held out) by patient-id glob patterns (case-insensitive).

    Patterns match the patient id (``NORMAL2-IM-*``, ``person1[5-9]??``), never a file name, so a
    patient is always wholly on one side. Raises ``ValueError`` when a pattern matches no patient (a
    typo would otherwise silently hold out nothing) or when nothing is left to train on.
    """
    pats = [p.lower() for p in patterns]
    if not pats:
        raise ValueError("give at least one patient-id pattern to hold out")
    patients = {r.patient_id.lower() for r in records}
    for p in pats:
        if not fnmatch.filter(patients, p):
            raise ValueError(f"hold-out pattern {p!r} matches no patient id (ids look like {sorted(patients)[:3]})")
    out = {pid for pid in patients if any(fnmatch.fnmatchcase(pid, p) for p in pats)}
    kept = [r for r in records if r.patient_id.lower() not in out]
    held = [r for r in records if r.patient_id.lower() in out]
    if not kept:
        raise ValueError(f"hold-out patterns {list(patterns)} match every patient: nothing left to train on")
    return kept, held
