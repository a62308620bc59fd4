"""Dataset release: manifest, dataset card, and streamed zip / WebDataset / DICOM export writers.

A plain library (no service code): the service hands it manifest rows and image readers, it writes one
archive file. See :mod:`models.release.writers` for the formats and the constant-memory contract.
"""

from models.release.card import CardInputs, card_markdown, dataset_card, licence_sources
from models.release.manifest import (
    BASE_FIELDS,
    MANIFEST_FIELDS,
    ManifestRow,
    ManifestWriter,
    iter_manifest,
    manifest_columns,
    manifest_csv,
    parse_manifest,
    read_header,
)
from models.release.writers import (
    CONTENT_TYPE,
    FORMATS,
    SUFFIX,
    ExportFormat,
    ReleaseRecord,
    ReleaseResult,
    ReleaseSpec,
    write_release,
)

__all__ = [
    "BASE_FIELDS",
    "CONTENT_TYPE",
    "FORMATS",
    "MANIFEST_FIELDS",
    "SUFFIX",
    "CardInputs",
    "ExportFormat",
    "ManifestRow",
    "ManifestWriter",
    "ReleaseRecord",
    "ReleaseResult",
    "ReleaseSpec",
    "card_markdown",
    "dataset_card",
    "iter_manifest",
    "licence_sources",
    "manifest_columns",
    "manifest_csv",
    "parse_manifest",
    "read_header",
    "write_release",
]
