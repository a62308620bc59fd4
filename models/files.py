"""File identity shared by the API and the library: one SHA-256 helper (light, no torch)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, streamed (``hashlib.file_digest``), e.g. a manifest or a network's weights."""
    with Path(path).open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
