"""Tenants (one hospital each) and their API keys; the CLI's ``tenants`` commands call these."""

from __future__ import annotations

import secrets

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

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
    return key


def list_tenants(session: Session) -> list[Tenant]:
    """All tenants, oldest first."""
    return list(session.scalars(select(Tenant).order_by(Tenant.created_at, Tenant.id)))


def list_api_keys(session: Session, tenant_id: str) -> list[ApiKey]:
    """A tenant's keys (hashes only; the clear key is never stored), oldest first."""
    return list(session.scalars(select(ApiKey).where(ApiKey.tenant_id == tenant_id)
                                .order_by(ApiKey.created_at, ApiKey.id)))


def authenticate(session: Session, api_key: str) -> Tenant | None:
    """The tenant of a valid, unrevoked key, else None (lookup by the key's SHA-256)."""
    if not api_key.startswith(API_KEY_PREFIX) or len(api_key) > 200:
        return None
    row = session.execute(
        select(Tenant, ApiKey.revoked_at)
        .join(ApiKey, ApiKey.tenant_id == Tenant.id)
        .where(ApiKey.key_hash == hash_api_key(api_key))
    ).first()
    if row is None or row[1] is not None:
        return None
    return row[0]
