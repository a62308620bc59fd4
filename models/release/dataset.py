"""A whole dataset export from a stored manifest: what goes in the card, the label ids, the members
beside the images, and the streamed build, whatever holds the images.

Storage-agnostic: the caller (the worker, ``worker/exports.py``) hands over plain facts about the
dataset and its generator (:class:`DatasetFacts`, :class:`GeneratorFacts`, read from its database rows),
the manifest as a local file, and a function that reads one image by its manifest ``file``; this module
writes one archive file through :func:`models.release.writers.write_release`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.callbacks import OnStep, no_progress
from models.files import file_sha256
from models.release.card import CardInputs
from models.release.manifest import iter_manifest, manifest_columns, read_header
from models.release.writers import FORMATS, REAL_IMAGE_FORMATS, ReleaseRecord, ReleaseResult, ReleaseSpec, write_release

READ_WORKERS = 8  # images read ahead in threads: object stores answer each GET with latency


@dataclass(frozen=True)
class DatasetFacts:
    """What an export says about its dataset (from the dataset's row)."""

    id: str
    name: str
    origin: str  # "real" | "synthetic"
    num_images: int
    label_counts: Mapping[str, Any] | None
    card: Mapping[str, Any] | None = None  # the row's card (generation, generator, source), as stored
    gate_status: str | None = "not_run"
    privacy: Mapping[str, Any] | None = None
    created_at: str | None = None  # ISO 8601, UTC


@dataclass(frozen=True)
class GeneratorFacts:
    """The generator a synthetic dataset came from (its row): licences, config and fidelity for the card."""

    id: str
    name: str
    config: Mapping[str, Any] = field(default_factory=dict)
    readme: str = ""  # the model card
    metrics: Mapping[str, Any] = field(default_factory=dict)


def formats_for_origin(origin: str) -> tuple[str, ...]:
    """Export formats a dataset of ``origin`` offers: every one for synthetic datasets; real ones lack the
    synthetic-only formats (DICOM says "synthetic" in every file)."""
    return FORMATS if origin == "synthetic" else REAL_IMAGE_FORMATS


def label_ids(ds: DatasetFacts, generator_config: Mapping[str, Any]) -> dict[str, int]:
    """Class ids of the labels: the generator's own (synthetic), else the sorted labels numbered from 0."""
    labels = generator_config.get("labels")
    if isinstance(labels, dict) and labels and ds.origin == "synthetic":
        ids = {str(k): int(v) for k, v in labels.items()}
    else:
        ids = {name: i for i, name in enumerate(sorted(ds.label_counts or {}))}
    for name in sorted(ds.label_counts or {}):
        ids.setdefault(name, len(ids))
    return ids


def card_inputs(ds: DatasetFacts, generator: GeneratorFacts | None, manifest_sha256: str) -> CardInputs:
    """The dataset card's inputs: identity and counts; a real dataset's source; a synthetic one's generator
    (licences from its model card), generation parameters, privacy gate and fidelity figures."""
    card = dict(ds.card or {})
    common: dict[str, Any] = dict(dataset_id=ds.id, name=ds.name, origin=ds.origin, num_images=ds.num_images,
                                  label_counts={str(k): int(v) for k, v in (ds.label_counts or {}).items()},
                                  manifest_sha256=manifest_sha256, created_at=ds.created_at)
    if ds.origin != "synthetic":
        source: dict[str, Any] = {k: card[k] for k in ("source", "registered_prefix", "image_format") if k in card}
        return CardInputs(**common, source=source)
    gen_info: dict[str, Any] = dict(card.get("generator") or {})
    readme = ""
    fidelity = card.get("fidelity") if isinstance(card.get("fidelity"), dict) else None
    if generator is not None:
        gen_info = {"id": generator.id, "name": generator.name, "config": dict(generator.config or {})}
        readme = generator.readme or ""
        if fidelity is None and generator.metrics:
            fidelity = {"measured_on": "the generator (not this dataset)", **generator.metrics}
    return CardInputs(**common, generator=gen_info or None, generator_readme=readme,
                      generation=card.get("generation") or {}, gate_status=ds.gate_status or "not_run",
                      privacy=ds.privacy, fidelity=fidelity)


def legacy_dataset_json(ds: DatasetFacts) -> bytes:
    """``dataset.json`` of zip exports (kept for readers of earlier exports)."""
    meta = {"id": ds.id, "name": ds.name, "origin": ds.origin, "num_images": ds.num_images,
            "label_counts": ds.label_counts, "card": ds.card}
    return json.dumps(meta, indent=2, sort_keys=True, default=str).encode()


def build_dataset_release(
    fmt: str, out: Path, manifest_path: Path, read_image: Callable[[str], bytes], ds: DatasetFacts,
    generator: GeneratorFacts | None = None, *, on_step: OnStep = no_progress, read_workers: int = READ_WORKERS,
) -> ReleaseResult:
    """Write the ``fmt`` export of ``ds`` to ``out``: the images of the manifest at ``manifest_path`` (each
    read by ``read_image(file)`` when its turn comes), streamed; memory stays flat however many images.

    ``generator`` supplies a synthetic dataset's licences and fidelity (else the card's own record).
    Deterministic: the same inputs give the same bytes.
    """
    if fmt not in formats_for_origin(ds.origin):
        raise ValueError(f"a {ds.origin} dataset has no {fmt!r} export (one of "
                         f"{', '.join(formats_for_origin(ds.origin))})")
    with manifest_path.open(newline="", encoding="utf-8") as f:
        header = read_header(f)
    gen_config = dict((generator.config if generator is not None else None)
                      or ((ds.card or {}).get("generator") or {}).get("config") or {})
    spec = ReleaseSpec(card=card_inputs(ds, generator, file_sha256(manifest_path)),
                       manifest_columns=manifest_columns(header, ds.origin == "synthetic"),
                       label_ids=label_ids(ds, gen_config),
                       extra_files={"dataset.json": legacy_dataset_json(ds)} if fmt == "zip" else {},
                       read_workers=read_workers)

    def reader(file: str) -> Callable[[], bytes]:
        return lambda: read_image(file)

    def records() -> Iterator[ReleaseRecord]:
        with manifest_path.open(newline="", encoding="utf-8") as mf:
            for row in iter_manifest(mf):
                yield ReleaseRecord(row, reader(row.file))

    return write_release(fmt, out, records(), spec, on_step=on_step)
