"""The per-image manifest of a dataset (``manifest.csv``): what each image is and where it came from.

One row per image: ``file`` (path relative to the dataset, ``LABEL/NAME.png``), ``label``, ``sha256`` of
the stored image bytes and, for synthetic images, how it was made (``index``, ``seed``, ``sampler``,
``steps``, ``guidance``, ``generator_id``) and how close it is to the generator's training data
(``nn_pixel_similarity``, ``nn_embedding_similarity``, ``replaced``; written by the privacy gate).
Unknown values are empty cells. Columns this module does not know are kept in :attr:`ManifestRow.extra`
so a reader never drops what a writer added.

Manifests are read and written as streams (:func:`iter_manifest`, :class:`ManifestWriter`): an export of
100k images never holds the manifest in memory.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, TextIO

BASE_FIELDS: tuple[str, ...] = ("file", "label", "sha256")
PROVENANCE_FIELDS: tuple[str, ...] = ("index", "seed", "sampler", "steps", "guidance", "generator_id")
PRIVACY_FIELDS: tuple[str, ...] = ("nn_pixel_similarity", "nn_embedding_similarity", "replaced")
MANIFEST_FIELDS: tuple[str, ...] = BASE_FIELDS + PROVENANCE_FIELDS + PRIVACY_FIELDS
"""Every known column, in order: the header of a synthetic dataset's manifest."""

_INT_FIELDS = frozenset({"index", "seed", "steps"})
_FLOAT_FIELDS = frozenset({"guidance", "nn_pixel_similarity", "nn_embedding_similarity"})
_BOOL_FIELDS = frozenset({"replaced"})
_TRUE = frozenset({"true", "1", "yes", "y", "t"})
_FALSE = frozenset({"false", "0", "no", "n", "f"})


@dataclass(frozen=True)
class ManifestRow:
    """One image of a dataset. Only ``file``, ``label`` and ``sha256`` are always known."""

    file: str
    label: str
    sha256: str
    index: int | None = None
    seed: int | None = None
    sampler: str | None = None
    steps: int | None = None
    guidance: float | None = None
    generator_id: str | None = None
    nn_pixel_similarity: float | None = None
    nn_embedding_similarity: float | None = None
    replaced: bool | None = None
    extra: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)
    """Columns of the source manifest this version does not know (passed through unchanged)."""

    def value(self, name: str) -> Any:
        """The typed value of column ``name`` (known field or an extra column; None when unknown)."""
        if name in _KNOWN:
            return getattr(self, name)
        return self.extra.get(name)

    def as_json(self) -> dict[str, Any]:
        """Typed values (numbers as numbers, unknown as null), extra columns included."""
        out: dict[str, Any] = {name: getattr(self, name) for name in MANIFEST_FIELDS}
        out.update(self.extra)
        return out

    @classmethod
    def from_cells(cls, cells: Mapping[str, str | None]) -> ManifestRow:
        """A row from CSV cells (strings; empty or missing = unknown)."""
        known: dict[str, Any] = {}
        for name in MANIFEST_FIELDS:
            known[name] = _parse(name, cells.get(name))
        for name in BASE_FIELDS:
            if known[name] is None:
                known[name] = ""
        extra = {k: (v or "") for k, v in cells.items() if k is not None and k not in _KNOWN}
        return cls(**known, extra=extra)


_KNOWN = frozenset(f.name for f in fields(ManifestRow) if f.name != "extra")


def _parse(name: str, text: str | None) -> Any:
    if text is None:
        return None
    text = text.strip()
    if name in BASE_FIELDS:
        return text
    if text == "" or text.lower() in ("none", "null", "nan"):
        return None
    try:
        if name in _INT_FIELDS:
            return int(float(text)) if "." in text or "e" in text.lower() else int(text)
        if name in _FLOAT_FIELDS:
            return float(text)
    except ValueError as exc:
        raise ValueError(f"manifest column {name!r}: {text!r} is not a number") from exc
    if name in _BOOL_FIELDS:
        low = text.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError(f"manifest column {name!r}: {text!r} is not true/false")
    return text


def format_cell(value: Any) -> str:
    """A CSV cell: empty for unknown, ``true``/``false`` for booleans, shortest round-trip float text."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def manifest_columns(rows_header: Sequence[str] | None, synthetic: bool) -> list[str]:
    """Columns of a manifest: every known column for synthetic datasets (empty when unknown), the base
    three for real ones; then any extra columns of the source header, in their order."""
    cols = list(MANIFEST_FIELDS if synthetic else BASE_FIELDS)
    cols += [name for name in rows_header or () if name not in cols]
    return cols


class ManifestWriter:
    """Writes rows to a text stream as CSV with a fixed header (``columns``), one row at a time."""

    def __init__(self, stream: TextIO, columns: Sequence[str]) -> None:
        self.columns = list(columns)
        self._writer = csv.writer(stream, lineterminator="\n")
        self._writer.writerow(self.columns)
        self.rows = 0

    def write(self, row: ManifestRow, **extra: Any) -> None:
        """Write ``row``; ``extra`` fills export-specific columns (e.g. ``shard``, ``key``)."""
        cells = [format_cell(extra[c]) if c in extra else format_cell(row.value(c)) for c in self.columns]
        self._writer.writerow(cells)
        self.rows += 1


def manifest_csv(rows: Iterable[ManifestRow], columns: Sequence[str] = BASE_FIELDS) -> bytes:
    """``manifest.csv`` bytes of ``rows`` (default header ``file,label,sha256``)."""
    buf = io.StringIO()
    writer = ManifestWriter(buf, columns)
    for r in rows:
        writer.write(r)
    return buf.getvalue().encode()


def iter_manifest(stream: TextIO) -> Iterator[ManifestRow]:
    """Rows of a ``manifest.csv`` text stream, parsed lazily (constant memory)."""
    for cells in csv.DictReader(stream):
        yield ManifestRow.from_cells(cells)


def read_header(stream: TextIO) -> list[str]:
    """The header of a ``manifest.csv`` text stream (the stream is left after the first line)."""
    line = stream.readline()
    return next(csv.reader([line])) if line.strip() else []


def parse_manifest(data: bytes) -> list[ManifestRow]:
    """All rows of ``manifest.csv`` bytes (small manifests; stream large ones with :func:`iter_manifest`)."""
    return list(iter_manifest(io.StringIO(data.decode("utf-8"))))
