"""Presentation helpers of the console: number and date formatting, model-card Markdown, security headers.

Nothing here decides anything about the data; it only turns what the services return into HTML.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from markdown_it import MarkdownIt
from markdown_it.token import Token

from app.core.config import Settings


def fmt_number(value: Any) -> str:
    """Integers with thousands separators; floats with 4 significant digits (no exponent for 1e-3..1e6)."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value == 0:
            return "0"
        if 1e-3 <= abs(value) < 1e6:
            digits = max(0, 3 - math.floor(math.log10(abs(value))))
            text = f"{value:,.{digits}f}"
            return text.rstrip("0").rstrip(".") if "." in text else text
        return f"{value:.3e}"
    return str(value)


def fmt_time(value: datetime | str | None, short: bool = False) -> str:
    """``2025-01-31 14:05:09 UTC`` (what the API returns as ISO 8601); ``short``: ``2025-01-31 14:05``."""
    if value is None:
        return "—"
    if isinstance(value, str):
        try:
            when = datetime.fromisoformat(value)
        except ValueError:
            return value
    else:
        when = value
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M" if short else "%Y-%m-%d %H:%M:%S UTC")


def fmt_bytes(n: int | None) -> str:
    """``12.3 MB`` (decimal units)."""
    if n is None:
        return "—"
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:,.0f} {unit}" if unit == "B" else f"{size:,.1f} {unit}"
        size /= 1000
    return f"{n} B"


def humanise_key(key: str) -> str:
    """``nn_pixel_similarity`` -> ``nn pixel similarity`` (table headings)."""
    return re.sub(r"[_\-]+", " ", str(key)).strip()


def is_table(value: Any) -> bool:
    """A non-empty list of flat dicts: shown as a table (one row per dict)."""
    return (isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)
            and all(not isinstance(x, (dict, list)) for v in value for x in v.values()))


def table_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The union of the rows' keys, in first-seen order."""
    cols: dict[str, None] = {}
    for r in rows:
        for k in r:
            cols.setdefault(k, None)
    return list(cols)


def is_row_table(value: Any) -> bool:
    """A dict of flat dicts (``{"synthetic_vs_real": {"fid": ..}, "real_vs_real": {...}}``): a table
    with one row per key."""
    return (isinstance(value, dict) and len(value) > 1 and all(isinstance(v, dict) and v for v in value.values())
            and all(not isinstance(x, (dict, list)) for v in value.values() for x in v.values()))


def is_number_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)


# --------------------------------------------------------------------------------------------------
# Model cards (Markdown)
# --------------------------------------------------------------------------------------------------
_RELATIVE_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,120}\.(png|jpe?g|gif|svg|webp)$", re.IGNORECASE)


def render_card(markdown: str, file_url_base: str) -> str:
    """Model-card Markdown to HTML. Raw HTML in the card is escaped, not rendered (``html=False``) and
    markdown-it refuses ``javascript:``-style links; images named by a bare file name (``samples.png``)
    are pointed at ``file_url_base/NAME`` (the console route serving the model's own files)."""
    md = MarkdownIt("commonmark", {"html": False}).enable("table")

    def image(renderer: Any, tokens: list[Token], idx: int, options: Any, env: Any) -> str:
        token = tokens[idx]
        src = str(token.attrGet("src") or "")
        if _RELATIVE_FILE.match(src):
            token.attrSet("src", f"{file_url_base}/{quote(src)}")
        token.attrSet("loading", "lazy")
        return str(renderer.image(tokens, idx, options, env))  # markdown-it's own rule (alt from children)

    def heading(renderer: Any, tokens: list[Token], idx: int, options: Any, env: Any) -> str:
        # The card sits under the page's h1 and a "Model card" h2: its "# Title" becomes an h3.
        token = tokens[idx]
        token.tag = f"h{min(6, int(token.tag[1]) + 2)}"
        return str(renderer.renderToken(tokens, idx, options, env))

    md.add_render_rule("image", image)
    md.add_render_rule("heading_open", heading)
    md.add_render_rule("heading_close", heading)
    return md.render(markdown)


# --------------------------------------------------------------------------------------------------
# Security headers
# --------------------------------------------------------------------------------------------------
def image_origins(settings: Settings) -> list[str]:
    """Origins thumbnails are loaded from besides the app: the S3 endpoint of presigned URLs."""
    if settings.storage_backend != "s3":
        return []
    host = settings.s3_public_endpoint or settings.s3_endpoint
    return [f"{'https' if settings.s3_secure else 'http'}://{host}"]


def security_headers(settings: Settings) -> dict[str, str]:
    """Headers of every console page: a strict CSP (own scripts and styles only, no inline code),
    no framing, no referrer (signed URLs never leak), no caching of tenant data."""
    img = " ".join(["'self'", "data:", *image_origins(settings)])
    csp = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src " + img + "; connect-src 'self'; "
           "form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'")
    return {
        "Content-Security-Policy": csp,
        "X-Frame-Options": "DENY",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-store",
    }
