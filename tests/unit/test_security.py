"""Signed download tokens, API-key hashing and webhook signatures (app.core.security)."""

from __future__ import annotations

import base64
import hashlib
import json
import time

import pytest

from app.core.security import (
    API_KEY_PREFIX,
    DownloadGrant,
    InvalidToken,
    hash_api_key,
    key_lookup_prefix,
    new_api_key,
    sign_download,
    verify_download,
    webhook_signature,
)

SECRET = "unit-test-secret"


def grant(expires_in: float = 60) -> DownloadGrant:
    return DownloadGrant(key="tenants/t1/datasets/d1/release.zip", expires=int(time.time() + expires_in),
                         filename="release.zip", content_type="application/zip")


def test_sign_and_verify_round_trip() -> None:
    g = grant()
    token = sign_download(SECRET, g)
    assert verify_download(SECRET, token) == g
    assert "/" not in token and "+" not in token  # url-safe: it sits in a URL path


def test_wrong_secret_is_refused() -> None:
    with pytest.raises(InvalidToken, match="signature"):
        verify_download("another-secret", sign_download(SECRET, grant()))


def test_tampered_body_is_refused() -> None:
    body, mac = sign_download(SECRET, grant()).split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    claims["key"] = "tenants/t2/datasets/d9/release.zip"  # try another tenant's object
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    with pytest.raises(InvalidToken):
        verify_download(SECRET, f"{forged}.{mac}")


def test_tampered_signature_is_refused() -> None:
    token = sign_download(SECRET, grant())
    flipped = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]
    with pytest.raises(InvalidToken):
        verify_download(SECRET, flipped)


@pytest.mark.parametrize("token", ["", "no-dot", ".", "abc.def", "!!!.???", "e30.e30"])
def test_malformed_tokens_are_refused(token: str) -> None:
    with pytest.raises(InvalidToken):
        verify_download(SECRET, token)


def test_expiry() -> None:
    g = grant(expires_in=10)
    token = sign_download(SECRET, g)
    assert verify_download(SECRET, token, now=g.expires) == g  # valid up to and including `expires`
    with pytest.raises(InvalidToken, match="expired"):
        verify_download(SECRET, token, now=g.expires + 1)
    with pytest.raises(InvalidToken, match="expired"):
        verify_download(SECRET, sign_download(SECRET, grant(expires_in=-1)))


def test_api_keys() -> None:
    a, b = new_api_key(), new_api_key()
    assert a != b and a.startswith(API_KEY_PREFIX) and len(a) == len(API_KEY_PREFIX) + 43
    assert hash_api_key(a) == hashlib.sha256(a.encode()).hexdigest()
    assert hash_api_key(a) != hash_api_key(b)
    assert key_lookup_prefix(a) == a[:12]


def test_webhook_signature_known_vector() -> None:
    """Expected value computed independently with
    ``printf 'wh_123.1700000000.<body>' | openssl dgst -sha256 -hmac whsec-test-secret -binary | base64``.
    """
    body = b'{"id":"job_1","status":"succeeded"}'
    signature = webhook_signature("whsec-test-secret", "wh_123", 1700000000, body)
    assert signature == "v1,2Skf86Sr5VGmrLB1QDxLwx5lsUIRGxzE4xgGPBD0r/8="


def test_webhook_signature_covers_id_timestamp_and_body() -> None:
    base = webhook_signature(SECRET, "wh_1", 1700000000, b"{}")
    assert base != webhook_signature(SECRET, "wh_2", 1700000000, b"{}")
    assert base != webhook_signature(SECRET, "wh_1", 1700000001, b"{}")
    assert base != webhook_signature(SECRET, "wh_1", 1700000000, b"{ }")
    assert base != webhook_signature("other", "wh_1", 1700000000, b"{}")
