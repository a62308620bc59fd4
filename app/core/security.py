"""API-key generation and hashing, signed download tokens, webhook signatures.

Hand-written on purpose: each is a few lines of ``hmac``/``hashlib`` from the standard library, and a
dependency would add surface without removing logic.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

API_KEY_PREFIX = "cxr_"


def new_api_key() -> str:
    """A new API key: ``cxr_`` + 43 url-safe characters (256 random bits)."""
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(key: str) -> str:
    """SHA-256 hex of a key: keys are high-entropy random, so a fast hash is safe to store."""
    return hashlib.sha256(key.encode()).hexdigest()


def key_lookup_prefix(key: str) -> str:
    """The first 12 characters, stored in clear to tell keys apart in listings."""
    return key[:12]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class DownloadGrant:
    """What a signed download token allows: one object key, until ``expires`` (unix seconds)."""

    key: str
    expires: int
    filename: str
    content_type: str


class InvalidToken(Exception):
    """The token is malformed, tampered with, or expired."""


def sign_download(secret: str, grant: DownloadGrant) -> str:
    """A compact token: base64url(JSON grant) + '.' + base64url(HMAC-SHA256)."""
    body = _b64(json.dumps(grant.__dict__, separators=(",", ":"), sort_keys=True).encode())
    mac = hmac.new(secret.encode(), body.encode(), hashlib.sha256).digest()
    return f"{body}.{_b64(mac)}"


def verify_download(secret: str, token: str, now: float | None = None) -> DownloadGrant:
    """Check signature and expiry of a download token; raise :class:`InvalidToken` otherwise."""
    try:
        body, mac = token.split(".", 1)
        expected = hmac.new(secret.encode(), body.encode(), hashlib.sha256).digest()
        if not hmac.compare_digest(expected, _unb64(mac)):
            raise InvalidToken("bad signature")
        grant = DownloadGrant(**json.loads(_unb64(body)))
    except (ValueError, TypeError, json.JSONDecodeError) as exc:
        raise InvalidToken("malformed token") from exc
    if grant.expires < (time.time() if now is None else now):
        raise InvalidToken("expired")
    return grant


def webhook_signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """Standard-Webhooks style signature ``v1,<base64 HMAC-SHA256 of 'id.timestamp.body'>``."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(secret.encode(), signed, hashlib.sha256).digest()).decode()
