"""Tenants (one hospital each) and their API keys; the CLI's ``tenants`` commands call these."""

from __future__ import annotations

import secrets
import threading

from cachetools import TTLCache
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, make_transient_to_detached

from app.core.problems import Conflict, InvalidInput, NotFound
from app.core.security import API_KEY_PREFIX, hash_api_key, key_lookup_prefix, new_api_key
from app.db.orm import ApiKey, Tenant, utcnow


def new_webhook_secret() -> str:
    """A webhook signing secret (``whsec_`` + 256 random bits, Standard-Webhooks style)."""
    return "whsec_" + secrets.token_urlsafe(32)


def create_tenant(session: Session, name: str, key_name: str = "default") -> tuple[Tenant, str]:
    """Create a tenant with one API key; returns the tenant and the key in clear (shown once).

    The tenant's ``webhook_secret`` is also in clear on the returned object (shown once with the key).
    Raises :class:`Conflict` when the name is taken.
    """
    name = name.strip()
    if not name or len(name) > 200:
        raise InvalidInput("tenant name must be 1 to 200 characters")
    if session.scalar(select(Tenant.id).where(Tenant.name == name)) is not None:
        raise Conflict(f"a tenant named {name!r} already exists", slug="tenant-exists")
    tenant = Tenant(name=name, webhook_secret=new_webhook_secret())
    session.add(tenant)
    try:
        session.flush()
    except IntegrityError as exc:
        session.rollback()
        raise Conflict(f"a tenant named {name!r} already exists", slug="tenant-exists") from exc
    _, plaintext = _add_key(session, tenant.id, key_name)
    session.commit()
    return tenant, plaintext


def _add_key(session: Session, tenant_id: str, name: str) -> tuple[ApiKey, str]:
    plaintext = new_api_key()
    key = ApiKey(tenant_id=tenant_id, prefix=key_lookup_prefix(plaintext), key_hash=hash_api_key(plaintext),
                 name=name)
    session.add(key)
    session.flush()
    return key, plaintext


def create_api_key(session: Session, tenant_id: str, name: str = "default") -> tuple[ApiKey, str]:
    """Add an API key to a tenant; returns the row and the key in clear (only the hash is stored)."""
    if session.get(Tenant, tenant_id) is None:
        raise NotFound(f"no tenant {tenant_id}")
    key, plaintext = _add_key(session, tenant_id, name)
    session.commit()
    return key, plaintext


def revoke_api_key(session: Session, key_id_or_prefix: str, tenant_id: str | None = None) -> ApiKey:
    """Revoke a key by id or by its clear prefix (``cxr_...``, first 12 characters); idempotent.

    ``tenant_id`` restricts the search to one tenant. Raises :class:`NotFound` or, for a prefix that
    matches several keys, :class:`Conflict`.
    """
    stmt = select(ApiKey)
    if key_id_or_prefix.startswith(API_KEY_PREFIX):
        stmt = stmt.where(ApiKey.prefix == key_lookup_prefix(key_id_or_prefix))
    else:
        stmt = stmt.where(ApiKey.id == key_id_or_prefix)
    if tenant_id is not None:
        stmt = stmt.where(ApiKey.tenant_id == tenant_id)
    keys = list(session.scalars(stmt))
    if not keys:
        raise NotFound(f"no API key {key_id_or_prefix!r}")
    if len(keys) > 1:
        raise Conflict(f"{len(keys)} keys match {key_id_or_prefix!r}; revoke by id")
    key = keys[0]
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        session.commit()
    _KEYS.drop(key.key_hash)
    return key


def list_tenants(session: Session) -> list[Tenant]:
    """All tenants, oldest first."""
    return list(session.scalars(select(Tenant).order_by(Tenant.created_at, Tenant.id)))


def list_api_keys(session: Session, tenant_id: str) -> list[ApiKey]:
    """A tenant's keys (hashes only; the clear key is never stored), oldest first."""
    return list(session.scalars(select(ApiKey).where(ApiKey.tenant_id == tenant_id)
                                .order_by(ApiKey.created_at, ApiKey.id)))


class _KeyCache:
    """Valid keys seen in the last ``ttl`` seconds: key hash -> the tenant as loaded then (detached).

    Each request otherwise spends a database round trip on the key; with this, a busy client's requests
    reuse the lookup (benchmarks/api_load.py). Only valid keys are kept, so unknown keys cannot fill it;
    at most ``MAX`` entries. One per process; ``revoke_api_key`` drops the key here at once, other
    processes see a revocation within ``ttl`` (``Settings.auth_cache_ttl_s``)."""

    MAX = 10_000

    def __init__(self) -> None:
        self._lock = threading.Lock()  # TTLCache is not thread-safe; FastAPI runs sync dependencies in threads
        self._caches: dict[float, TTLCache[str, Tenant]] = {}

    def _cache(self, ttl: float) -> TTLCache[str, Tenant]:
        cache = self._caches.get(ttl)
        if cache is None:
            cache = self._caches[ttl] = TTLCache(maxsize=self.MAX, ttl=ttl)
        return cache

    def get(self, key_hash: str, ttl: float) -> Tenant | None:
        with self._lock:
            return self._cache(ttl).get(key_hash)

    def put(self, key_hash: str, tenant: Tenant, ttl: float) -> None:
        with self._lock:
            self._cache(ttl)[key_hash] = tenant

    def drop(self, key_hash: str) -> None:
        with self._lock:
            for cache in self._caches.values():
                cache.pop(key_hash, None)


_KEYS = _KeyCache()


def authenticate(session: Session, api_key: str, cache_ttl_s: float = 0.0) -> Tenant | None:
    """The tenant of a valid, unrevoked key, else None (lookup by the key's SHA-256).

    With ``cache_ttl_s`` > 0 a key found valid in the last ``cache_ttl_s`` seconds is not looked up again:
    its tenant is attached to ``session`` without a query (``merge(load=False)``)."""
    if not api_key.startswith(API_KEY_PREFIX) or len(api_key) > 200:
        return None
    key_hash = hash_api_key(api_key)
    if cache_ttl_s > 0:
        cached = _KEYS.get(key_hash, cache_ttl_s)
        if cached is not None:
            return session.merge(cached, load=False)
    row = session.execute(
        select(Tenant, ApiKey.revoked_at)
        .join(ApiKey, ApiKey.tenant_id == Tenant.id)
        .where(ApiKey.key_hash == key_hash)
    ).first()
    if row is None or row[1] is not None:
        return None
    tenant: Tenant = row[0]
    if cache_ttl_s > 0:
        snapshot = Tenant(id=tenant.id, name=tenant.name, webhook_secret=tenant.webhook_secret,
                          created_at=tenant.created_at)  # a copy, never part of a live session
        make_transient_to_detached(snapshot)  # what merge(load=False) takes: a row known to exist
        _KEYS.put(key_hash, snapshot, cache_ttl_s)
    return tenant
