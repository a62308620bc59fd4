"""Readiness checks (database, broker, storage) and the numbers ``/metrics`` reads at scrape time.

Everything here reads shared state (the database, the broker), never process memory, so every API
process reports the same jobs, queue depth and image count.
"""

from __future__ import annotations

import os
from functools import lru_cache

import redis
from sqlalchemy import func, select, text

from app.core.config import Settings
from app.core.queue import CPU_QUEUE, GPU_QUEUE
from app.db.orm import Job, JobKind, JobStatus
from app.db.session import get_engine, get_sessionmaker
from app.storage.base import ObjectStore

QUEUES = (GPU_QUEUE, CPU_QUEUE)


@lru_cache(maxsize=8)
def redis_client(url: str) -> redis.Redis:
    """A pooled Redis client with short timeouts (probes must answer quickly)."""
    return redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)


def _is_redis(url: str) -> bool:
    return url.startswith(("redis://", "rediss://", "unix://"))


def check_database(settings: Settings) -> None:
    """``SELECT 1`` on the database; raises when it is unreachable."""
    with get_engine(settings.database_url).connect() as conn:
        conn.execute(text("SELECT 1"))


def check_broker(settings: Settings) -> None:
    """Redis: ``PING``; filesystem broker: its queue folder exists and is writable; raises otherwise."""
    if _is_redis(settings.broker_url):
        redis_client(settings.broker_url).ping()
    elif settings.embedded:
        folder = settings.broker_dir / "queue"
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK):
            raise OSError(f"broker folder not writable: {folder}")


def readiness(settings: Settings, store: ObjectStore) -> dict[str, str]:
    """``{"database"|"broker"|"storage": "ok" or "error: <type>"}`` (no internals beyond the type)."""
    checks = {"database": lambda: check_database(settings), "broker": lambda: check_broker(settings),
              "storage": store.ping}
    out = {}
    for name, check in checks.items():
        try:
            check()
            out[name] = "ok"
        except Exception as exc:
            out[name] = f"error: {type(exc).__name__}"
    return out


def queue_depths(settings: Settings) -> dict[str, int]:
    """Messages waiting per queue: Redis ``LLEN``; filesystem broker: message files per queue."""
    if _is_redis(settings.broker_url):
        client = redis_client(settings.broker_url)
        return {q: int(client.llen(q)) for q in QUEUES}  # type: ignore[arg-type]
    if settings.embedded:
        folder = settings.broker_dir / "queue"
        names = os.listdir(folder) if folder.is_dir() else []
        return {q: sum(1 for n in names if n.endswith(f".{q}.msg")) for q in QUEUES}
    return {}


def job_counts(settings: Settings) -> dict[tuple[str, str], int]:
    """Jobs per ``(kind, status)``, every combination present (zeros included)."""
    counts = {(k.value, s.value): 0 for k in JobKind for s in JobStatus}
    with get_sessionmaker(settings.database_url)() as session:
        stmt = select(Job.kind, Job.status, func.count()).group_by(Job.kind, Job.status)
        for kind, status, n in session.execute(stmt):
            counts[(kind, status)] = int(n)
    return counts


def images_generated(settings: Settings) -> int:
    """Images made by succeeded generation jobs: the sum of their ``result.num_images``."""
    stmt = select(func.coalesce(func.sum(Job.result["num_images"].as_integer()), 0)).where(
        Job.kind == JobKind.generation.value, Job.status == JobStatus.succeeded.value)
    with get_sessionmaker(settings.database_url)() as session:
        return int(session.scalar(stmt) or 0)
