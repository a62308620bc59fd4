"""Opaque cursor paging, newest first and stable under equal timestamps (ties broken by id)."""

from __future__ import annotations

import base64
import binascii
import json
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import Select, and_, or_
from sqlalchemy.orm import Session

from app.core.problems import InvalidInput

T = TypeVar("T")


def as_utc(value: datetime) -> datetime:
    """Timezone-aware UTC (SQLite hands datetimes back naive; they are stored as UTC)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def encode_cursor(*parts: Any) -> str:
    """An opaque, URL-safe cursor of JSON-able parts."""
    raw = json.dumps(list(parts), separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def decode_cursor(cursor: str) -> list[Any]:
    """The parts of a cursor made by :func:`encode_cursor`; 422 problem when it is not one."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        parts = json.loads(raw)
    except (binascii.Error, ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput("cursor is not a cursor returned by this API", slug="invalid-cursor") from exc
    if not isinstance(parts, list):
        raise InvalidInput("cursor is not a cursor returned by this API", slug="invalid-cursor")
    return parts


DEFAULT_PAGE_SIZE = 50


def check_limit(limit: int | None, page_size_max: int) -> int:
    """``limit`` within 1..page_size_max (422 otherwise); None = min(50, page_size_max)."""
    if limit is None:
        return min(DEFAULT_PAGE_SIZE, page_size_max)
    if not 1 <= limit <= page_size_max:
        raise InvalidInput(f"limit must be between 1 and {page_size_max}", slug="invalid-limit")
    return limit


def paginate_newest_first(
    session: Session, stmt: Select[T], model: Any, cursor: str | None, limit: int
) -> tuple[list[T], str | None]:
    """Run ``stmt`` (a ``select(model)`` with its filters) one page at a time, newest first.

    Ordered by ``(created_at DESC, id DESC)``; the cursor is the last row's ``(created_at, id)``, so
    rows inserted meanwhile never cause duplicates or gaps among older rows.
    """
    if cursor:
        parts = decode_cursor(cursor)
        try:
            ts, last_id = datetime.fromisoformat(parts[0]), str(parts[1])
        except (IndexError, TypeError, ValueError) as exc:
            raise InvalidInput("cursor is not a cursor returned by this API", slug="invalid-cursor") from exc
        stmt = stmt.where(or_(model.created_at < ts, and_(model.created_at == ts, model.id < last_id)))
    rows = list(session.scalars(stmt.order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1)))
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        last = rows[-1]
        next_cursor = encode_cursor(last.created_at.isoformat(), last.id)  # type: ignore[attr-defined]
    return rows, next_cursor
