"""How a worker rides out a restart of Postgres, S3 or the broker (no services needed): which errors count
as a lost connection, the bounded re-run of an idempotent step, the S3 retry budget and the connect retry.

The real faults are in ``tests/e2e/test_chaos.py``."""

from __future__ import annotations

import time

import pytest
import urllib3
from kombu.exceptions import OperationalError as BrokerError
from sqlalchemy import create_engine, text
from sqlalchemy.exc import IntegrityError, OperationalError

from app.db.session import retry_connects
from app.storage.s3 import RETRY_BACKOFF_MAX_S, patient_http_client, retry_count_for
from tests.support import free_port
from worker.runtime import is_transient, retry_transient


def test_lost_connections_are_transient_and_job_faults_are_not() -> None:
    assert is_transient(OperationalError("SELECT 1", {}, Exception("server closed the connection")))
    assert is_transient(urllib3.exceptions.MaxRetryError(None, "/bucket/key"))  # type: ignore[arg-type]
    assert is_transient(BrokerError("Error 111 connecting"))
    assert is_transient(ConnectionRefusedError())
    assert not is_transient(IntegrityError("INSERT", {}, Exception("duplicate key")))
    assert not is_transient(ValueError("unknown label"))


def test_retry_transient_runs_an_idempotent_step_again_then_gives_up() -> None:
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("connection reset by peer")
        return "done"

    assert retry_transient(flaky, "test step", pauses_s=(0.0, 0.0, 0.0)) == "done"
    assert len(calls) == 3

    def always_down() -> None:
        calls.append(1)
        raise ConnectionRefusedError("down")

    calls.clear()
    with pytest.raises(ConnectionRefusedError):
        retry_transient(always_down, "test step", pauses_s=(0.0, 0.0))
    assert len(calls) == 3  # the first run and one per pause

    def bug() -> None:
        calls.append(1)
        raise ValueError("a fault of the job")

    calls.clear()
    with pytest.raises(ValueError):
        retry_transient(bug, "test step", pauses_s=(0.0, 0.0))
    assert len(calls) == 1  # never repeated


def test_s3_retry_budget_spans_the_asked_outage() -> None:
    n = retry_count_for(120.0)
    waits = [0.0] + [min(RETRY_BACKOFF_MAX_S, 0.5 * 2 ** (k - 1)) for k in range(2, n + 1)]
    assert sum(waits) >= 120.0 > sum(waits[:-1])
    retries = patient_http_client(120.0, secure=False).connection_pool_kw["retries"]
    assert retries.total == n and 503 in retries.status_forcelist


def test_retry_connects_waits_for_the_database_then_fails() -> None:
    port = free_port()  # nothing listens: every connect is refused
    engine = create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{port}/x", pool_pre_ping=True)
    retry_connects(engine, budget_s=1.2)
    retry_connects(engine, budget_s=1.2)  # a second call adds nothing
    t0 = time.monotonic()
    with pytest.raises(OperationalError), engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    assert 0.4 < time.monotonic() - t0 < 10  # one 0.5 s pause fits in 1.2 s, the next (1 s) would not
    sqlite = create_engine("sqlite://")
    retry_connects(sqlite, budget_s=60)  # SQLite is left alone
    with sqlite.connect() as conn:
        assert conn.execute(text("SELECT 1")).scalar() == 1
