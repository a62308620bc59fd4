"""Job submissions/s and status reads/s against the real stack, beside a bare FastAPI endpoint.

Starts, on this machine: a fresh Postgres database, Redis (db 14) as the broker, the cxrsynth API in
one uvicorn process, and ``benchmarks/bare_app.py`` in another; then drives each with the same
closed-loop load (``--concurrency`` clients, ``--seconds`` per phase) and reports throughput and
p50/p99 latency, with the ratio cxrsynth / bare. No worker runs, so jobs stay queued (the per-tenant
in-flight limit is lifted for the run). Writes ``docs/results/api_load.json``.

    .venv/bin/python -m benchmarks.api_load --seconds 10 --concurrency 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from benchmarks._common import REPO_ROOT, write_result

PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited while starting ({url})")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer")


async def _phase(make_request: Any, concurrency: int, seconds: float) -> dict[str, float]:
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds

    async def client_loop(i: int) -> None:
        nonlocal errors
        k = 0
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            resp = await make_request(i, k)
            latencies.append(time.perf_counter() - t0)
            if resp.status_code >= 400:
                errors += 1
            k += 1

    t_start = time.perf_counter()
    await asyncio.gather(*(client_loop(i) for i in range(concurrency)))
    wall = time.perf_counter() - t_start
    qs = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [latencies[0]] * 99
    return {"requests": len(latencies), "errors": errors, "per_s": len(latencies) / wall,
            "p50_ms": qs[49] * 1000, "p99_ms": qs[98] * 1000}


async def _run_load(api: str, key: str, bare: str, concurrency: int, seconds: float) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=30, limits=limits) as http:
        headers = {"Authorization": f"Bearer {key}"}
        job_ids: list[str] = []

        async def submit(i: int, k: int) -> httpx.Response:
            resp = await http.post(f"{api}/v1/generations", json={"n": 4, "seed": k},
                                   headers={**headers, "Idempotency-Key": uuid.uuid4().hex})
            if resp.status_code == 202:
                job_ids.append(resp.json()["id"])
            return resp

        async def read(i: int, k: int) -> httpx.Response:
            return await http.get(f"{api}/v1/jobs/{job_ids[(i * 7919 + k) % len(job_ids)]}", headers=headers)

        async def bare_submit(i: int, k: int) -> httpx.Response:
            return await http.post(f"{bare}/bare", json={"n": 4, "seed": k})

        async def bare_read(i: int, k: int) -> httpx.Response:
            return await http.get(f"{bare}/bare/{uuid.uuid4().hex}")

        await _phase(bare_submit, concurrency, 1.0)  # warm-up both servers
        await _phase(submit, concurrency, 1.0)
        out = {
            "bare_submit": await _phase(bare_submit, concurrency, seconds),
            "submit": await _phase(submit, concurrency, seconds),
            "bare_read": await _phase(bare_read, concurrency, seconds),
            "read": await _phase(read, concurrency, seconds),
        }
        out["jobs_created"] = len(job_ids)
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each measured phase")
    parser.add_argument("--concurrency", type=int, default=16, help="closed-loop clients")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--json", type=Path, default=None, help="output (default docs/results/api_load.json)")
    args = parser.parse_args()

    import redis
    from sqlalchemy import create_engine, text

    from app.core.config import Settings
    from app.db.session import get_sessionmaker, migrate
    from app.services.model_assets import ensure_builtin_generators
    from app.services.tenants import create_tenant

    db = f"cxrsynth_bench_{int(time.time())}_{os.getpid()}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{db}"'))
    redis.Redis.from_url(args.redis).flushdb()
    tmp = Path(tempfile.mkdtemp(prefix="cxrsynth-bench-"))
    env_settings = {
        "CXRSYNTH_DATABASE_URL": f"postgresql+psycopg://postgres@127.0.0.1:5432/{db}",
        "CXRSYNTH_BROKER_URL": args.redis,
        "CXRSYNTH_DATA_DIR": str(tmp),
        "CXRSYNTH_MAX_JOBS_IN_FLIGHT_PER_TENANT": str(10**9),
    }
    settings = Settings(**{k.removeprefix("CXRSYNTH_").lower(): v for k, v in env_settings.items()})
    if not (settings.default_generator_dir / "cxrsynth.json").exists():
        from models.diffusion.testing import train_tiny_generator

        gen = tmp / "generator"
        train_tiny_generator(gen, REPO_ROOT.parent / "shared" / "data" / "pneumoniamnist" / "pneumoniamnist_28.npz")
        env_settings["CXRSYNTH_DEFAULT_GENERATOR_DIR"] = str(gen)
        settings = settings.model_copy(update={"default_generator_dir": gen})
    migrate(settings.database_url)
    with get_sessionmaker(settings.database_url)() as s:
        ensure_builtin_generators(s, settings)
        _, key = create_tenant(s, "bench")
        s.commit()

    env = {**os.environ, **env_settings, "PYTHONUNBUFFERED": "1"}
    api_port, bare_port = _free_port(), _free_port()
    log = (tmp / "servers.log").open("wb")
    api_proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory",
                                 "--port", str(api_port), "--log-level", "warning"], env=env, cwd=REPO_ROOT,
                                stdout=log, stderr=subprocess.STDOUT)
    bare_proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "benchmarks.bare_app:app", "--port",
                                  str(bare_port), "--log-level", "warning"], env=env, cwd=REPO_ROOT,
                                 stdout=log, stderr=subprocess.STDOUT)
    api, bare = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{bare_port}"
    try:
        _wait(f"{api}/healthz", api_proc)
        _wait(f"{bare}/bare/x", bare_proc)
        res = asyncio.run(_run_load(api, key, bare, args.concurrency, args.seconds))
    finally:
        api_proc.terminate()
        bare_proc.terminate()
        api_proc.wait(20)
        bare_proc.wait(20)
        from app.db.session import get_engine

        get_engine(settings.database_url).dispose()
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
        redis.Redis.from_url(args.redis).flushdb()

    rows = [("submit (POST /v1/generations)", res["submit"], res["bare_submit"]),
            ("status read (GET /v1/jobs/{id})", res["read"], res["bare_read"])]
    table = Table(title=f"API load, {args.concurrency} clients, {args.seconds:.0f} s per phase")
    for col in ("operation", "cxrsynth req/s", "p50 ms", "p99 ms", "errors", "bare req/s", "bare p99 ms",
                "ratio req/s"):
        table.add_column(col)
    for name, ours, ref in rows:
        table.add_row(name, f"{ours['per_s']:.0f}", f"{ours['p50_ms']:.1f}", f"{ours['p99_ms']:.1f}",
                      str(ours["errors"]), f"{ref['per_s']:.0f}", f"{ref['p99_ms']:.1f}",
                      f"{ours['per_s'] / ref['per_s']:.2f}")
    Console().print(table)
    payload = {"concurrency": args.concurrency, "seconds_per_phase": args.seconds, "results": res,
               "ratios": {"submit": res["submit"]["per_s"] / res["bare_submit"]["per_s"],
                          "read": res["read"]["per_s"] / res["bare_read"]["per_s"]},
               "stack": "Postgres 15 + Redis 7 broker + local object folder; 1 uvicorn process each"}
    path = write_result("api_load", payload, args.json)
    print(json.dumps(payload["ratios"]), "->", path)


if __name__ == "__main__":
    main()
