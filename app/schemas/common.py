"""Shapes shared by every resource: cursor pages, signed download links, problem details."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Generic, TypeVar

from pydantic import AfterValidator, AnyHttpUrl, BaseModel, Field, TypeAdapter

T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    """One page of a list, newest first; pass ``next_cursor`` back as ``cursor`` for the next page."""

    items: list[T]
    next_cursor: str | None = Field(None, description="Opaque; null on the last page.")


class DownloadLink(BaseModel):
    """A short-lived signed URL (served with ``Content-Disposition: attachment; filename=...``)."""

    url: str
    expires_at: datetime
    filename: str


class Problem(BaseModel):
    """RFC 9457 problem details (``application/problem+json``); extra members may follow."""

    type: str
    title: str
    status: int
    detail: str
    instance: str | None = None
    errors: list[dict[str, Any]] | None = None


_HTTP_URL: TypeAdapter[AnyHttpUrl] = TypeAdapter(AnyHttpUrl)


def _http_only(value: str) -> str:
    """Accept only absolute http(s) URLs with a host (no ``file:``, ``gopher:``, ``javascript:``...)."""
    url = _HTTP_URL.validate_python(value)
    if url.scheme not in ("http", "https"):
        raise ValueError("webhook_url must be http or https")
    if not url.host:
        raise ValueError("webhook_url needs a host")
    return str(url)


WebhookUrl = Annotated[
    str,
    Field(description="POSTed the job when it finishes (signed, retried with backoff); http(s) only.",
          min_length=1, max_length=2000),
    AfterValidator(_http_only),
]
