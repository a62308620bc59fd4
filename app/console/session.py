"""Console sessions: the API key in a signed, HttpOnly, SameSite=Strict cookie, plus a CSRF token.

The cookie holds ``{"k": api_key or None, "c": csrf_token}`` signed with ``itsdangerous`` (HMAC over the
service's ``signing_secret``, with a timestamp checked against ``console_session_ttl_s``). The key is
checked against the database on every request (:func:`app.services.tenants.authenticate`), so revoking
it ends every console session at once. The CSRF token is rotated at login and logout; every POST form
carries it and :func:`csrf_ok` compares it in constant time (SameSite=Strict is the first line).
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from typing import Any

from itsdangerous import BadSignature, URLSafeTimedSerializer
from starlette.requests import Request
from starlette.responses import Response

from app.core.config import Settings

COOKIE_NAME = "cxrsynth_console"
COOKIE_PATH = "/console"  # sent to the console's pages only (never to /v1, which reads headers, not cookies)
_SALT = "cxrsynth.console.session.v1"


@dataclass(frozen=True)
class ConsoleSession:
    """What the cookie carries: the API key (None before login) and the CSRF token."""

    csrf: str
    api_key: str | None = None


def new_session(api_key: str | None = None) -> ConsoleSession:
    """A session with a fresh CSRF token (256 random bits)."""
    return ConsoleSession(csrf=secrets.token_urlsafe(32), api_key=api_key)


def _serializer(settings: Settings) -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(settings.signing_secret.get_secret_value(), salt=_SALT)


def read_session(request: Request, settings: Settings) -> ConsoleSession | None:
    """The request's session, or None when the cookie is absent, tampered with or older than the TTL."""
    raw = request.cookies.get(COOKIE_NAME)
    if not raw:
        return None
    try:
        data: Any = _serializer(settings).loads(raw, max_age=settings.console_session_ttl_s)
    except BadSignature:  # SignatureExpired is a BadSignature
        return None
    if not isinstance(data, dict) or not isinstance(data.get("c"), str):
        return None
    key = data.get("k")
    return ConsoleSession(csrf=data["c"], api_key=key if isinstance(key, str) else None)


def write_session(response: Response, request: Request, settings: Settings, session: ConsoleSession) -> None:
    """Set the signed cookie: HttpOnly, SameSite=Strict, Secure when the request came over HTTPS."""
    value = _serializer(settings).dumps({"k": session.api_key, "c": session.csrf})
    response.set_cookie(COOKIE_NAME, value, max_age=settings.console_session_ttl_s, path=COOKIE_PATH,
                        httponly=True, samesite="strict", secure=request.url.scheme == "https")


def clear_session(response: Response, request: Request) -> None:
    """Delete the cookie (logout)."""
    response.delete_cookie(COOKIE_NAME, path=COOKIE_PATH, httponly=True, samesite="strict",
                           secure=request.url.scheme == "https")


def csrf_ok(session: ConsoleSession | None, submitted: str | None) -> bool:
    """True when a form's ``csrf_token`` matches the session's (constant-time comparison)."""
    if session is None or not submitted:
        return False
    return hmac.compare_digest(session.csrf.encode(), submitted.encode())


def same_origin(request: Request) -> bool:
    """False when the browser says the request came from another site (``Sec-Fetch-Site`` / ``Origin``).

    Browsers send these on POSTs; a missing header (old browser, test client) falls back to the token.
    """
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return False
    origin = request.headers.get("origin")
    if origin is not None and origin != "null":
        host = request.headers.get("host", "")
        return origin.split("://", 1)[-1] == host
    return True
