"""Engine and session factory, and ``migrate()`` which applies the Alembic migrations on start."""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from app.core.config import REPO_ROOT


@lru_cache(maxsize=8)
def get_engine(database_url: str) -> Engine:
    """One pooled engine per URL. SQLite gets WAL, a busy timeout and foreign keys on."""
    if database_url.startswith("sqlite"):
        path = database_url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(database_url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    return create_engine(database_url, pool_pre_ping=True, pool_size=10, max_overflow=20)


log = logging.getLogger("cxrsynth.db")
_RETRYING: weakref.WeakSet[Engine] = weakref.WeakSet()


def retry_connects(engine: Engine, budget_s: float) -> None:
    """Make new connections of ``engine`` wait out a database restart or outage of up to ``budget_s``.

    A failed connect is tried again with bounded exponential backoff (0.5 s doubling to 5 s) until
    ``budget_s`` has passed, then the error goes through. With ``pool_pre_ping`` a pooled connection
    that a restart ended is replaced through this path, so the worker's next transaction waits for the
    database instead of failing the job it serves. The API keeps failing fast (a 5xx the client retries).
    SQLite is left alone; calling it again for an engine does nothing.
    """
    if engine.dialect.name == "sqlite" or engine in _RETRYING:
        return
    _RETRYING.add(engine)

    @event.listens_for(engine, "do_connect")
    def _connect_with_retries(dialect: Any, _record: Any, cargs: Any, cparams: Any) -> Any:
        deadline = time.monotonic() + budget_s
        pause = 0.5
        while True:
            try:
                return dialect.connect(*cargs, **cparams)
            except dialect.loaded_dbapi.OperationalError as exc:
                if time.monotonic() + pause > deadline:
                    raise
                log.warning("database unreachable (%s); connecting again in %.1f s", str(exc).strip()[:200], pause)
                time.sleep(pause)
                pause = min(5.0, pause * 2)


@lru_cache(maxsize=8)
def get_sessionmaker(database_url: str) -> sessionmaker[Session]:
    """Session factory bound to the engine of ``database_url``; objects stay usable after commit."""
    return sessionmaker(bind=get_engine(database_url), expire_on_commit=False)


@contextmanager
def session_scope(database_url: str) -> Iterator[Session]:
    """A transaction: commit on success, roll back on error (used by the worker and the CLI)."""
    session = get_sessionmaker(database_url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def migrate(database_url: str) -> None:
    """Apply Alembic migrations up to head (idempotent; run by ``serve``, the worker and tests)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(REPO_ROOT / "migrations"))
    cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    cfg.attributes["engine"] = get_engine(database_url)
    command.upgrade(cfg, "head")
