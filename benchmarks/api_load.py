"""Job submissions/s and status reads/s against the real stack, beside a bare FastAPI endpoint, driven by wrk.

Starts, on this machine: a fresh Postgres database, Redis (db 14) as the broker, the cxrsynth API in
uvicorn, and ``benchmarks/bare_app.py`` in another uvicorn; then drives each with the same closed-loop
load from ``wrk`` (Debian's ``wrk``: C, one thread, so the load generator is not a Python client on the
same two cores) and reports throughput and p50/p99 latency, with the ratio cxrsynth / bare. No worker
runs, so jobs stay queued (the per-tenant in-flight limit is lifted for the run). With ``--profile``,
py-spy samples the API process during the submit and read phases (collapsed stacks, and the
result lists the functions with the most inclusive samples).
Writes ``docs/results/api_load.json`` (``--json`` to change).

    apt-get install -y wrk
    .venv/bin/python -m benchmarks.api_load --seconds 10 --concurrency 16
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from benchmarks._common import REPO_ROOT, RESULTS_DIR, write_result

PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
WRK_DIR = Path(__file__).resolve().parent / "wrk"
PHASES = ("bare_submit", "submit", "bare_read", "read")


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


@dataclass(frozen=True)
class Load:
    """How hard and how long wrk drives each phase."""

    concurrency: int
    seconds: float
    threads: int = 1


CPU_OWNERS = ("app.main:create_app", "benchmarks.bare_app:app", "postgres", "redis-server", "wrk ")


def wrk(url: str, script: str, args: list[str], load: Load, seconds: float | None = None) -> dict[str, Any]:
    """One wrk run (``wrk -s benchmarks/wrk/SCRIPT URL -- ARGS``); the JSON line its ``done`` hook prints, plus
    the CPU milliseconds per request each process group spent (where the two cores went)."""
    before = cpu_seconds(CPU_OWNERS)
    cmd = ["wrk", f"-t{load.threads}", f"-c{load.concurrency}", f"-d{seconds or load.seconds:g}s", "--latency",
           "--timeout", "10s", "-s", str(WRK_DIR / script), url, "--", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                         env={**os.environ, "WRK_REPORT": str(WRK_DIR / "report.lua")}).stdout
    match = re.search(r"^WRK_JSON (.*)$", out, re.M)
    if match is None:
        raise RuntimeError(f"wrk printed no result:\n{out}")
    result: dict[str, Any] = json.loads(match.group(1))
    result["errors_total"] = sum(result["errors"].values())
    after = cpu_seconds(CPU_OWNERS)
    n = max(result["requests"], 1)
    result["cpu_ms_per_request"] = {name.strip(): round(1000 * (after[name] - before[name]) / n, 3)
                                    for name in CPU_OWNERS}
    return result


def cpu_seconds(names: tuple[str, ...]) -> dict[str, float]:
    """User+system CPU seconds so far of every process whose command line, or an ancestor's, contains one of
    ``names`` (uvicorn's worker processes count for their server), summed per name; from /proc, so processes
    that ended before the second reading are not counted."""
    tick = os.sysconf("SC_CLK_TCK")
    procs: dict[int, tuple[int, str, float]] = {}  # pid -> (parent pid, command line, CPU seconds)
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        procs[int(proc.name)] = (int(fields[1]), cmdline, (int(fields[11]) + int(fields[12])) / tick)
    out = dict.fromkeys(names, 0.0)
    for pid, (_, _, cpu) in procs.items():
        seen, node = 0, pid
        while node in procs and seen < 64:
            owner = next((n for n in names if n in procs[node][1]), None)
            if owner is not None:
                out[owner] += cpu
                break
            node, seen = procs[node][0], seen + 1
    return out


@contextmanager
def py_spy(pid: int | None, out: Path | None) -> Iterator[None]:
    """Sample ``pid`` with py-spy (collapsed stacks, flamegraph.pl's input; only the thread holding the GIL,
    so the samples show where the Python CPU goes) while the block runs; nothing when
    ``out`` is None."""
    if out is None or pid is None:
        yield
        return
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    cmd = [exe, "record", "--pid", str(pid), "--format", "raw", "--rate", "200", "--output", str(out),
           "--nonblocking", "--subprocesses", "--gil"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        proc.send_signal(2)  # SIGINT: py-spy writes the profile and exits
        proc.wait(60)


def hot_functions(folded: Path, top: int = 25) -> list[dict[str, Any]]:
    """The functions of a py-spy collapsed-stack file with the largest share of samples anywhere on the stack
    (inclusive), request-handling threads only (idle event-loop and threadpool waits dropped)."""
    idle = ("select (selectors.py", "_worker (concurrent/futures", "wait (threading.py", "run_forever")
    inclusive: dict[str, int] = {}
    total = 0
    for line in folded.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if not frames or any(frames[-1].startswith(i) for i in idle):
            continue
        n = int(count)
        total += n
        for frame in dict.fromkeys(re.sub(r":\d+\)$", ")", f) for f in frames):  # one count per function
            inclusive[frame] = inclusive.get(frame, 0) + n
    ranked = sorted(inclusive.items(), key=lambda kv: -kv[1])[:top]
    return [{"function": f, "share": round(n / max(total, 1), 3)} for f, n in ranked]


@dataclass(frozen=True)
class Stack:
    """The running servers of one benchmark."""

    api: str
    bare: str
    key: str
    api_pid: int
    database_url: str


def run_phases(stack: Stack, load: Load, work: Path, profile_dir: Path | None) -> dict[str, Any]:
    """Warm both servers up, then the four measured phases; job ids for the read phase come from the DB."""
    from sqlalchemy import create_engine, text

    submit_args = {"bare_submit": ["/bare", ""], "submit": ["/v1/generations", stack.key]}
    wrk(stack.bare, "submit.lua", submit_args["bare_submit"], load, seconds=2)
    wrk(stack.api, "submit.lua", submit_args["submit"], load, seconds=2)
    out: dict[str, Any] = {}
    out["bare_submit"] = wrk(stack.bare, "submit.lua", submit_args["bare_submit"], load)
    with py_spy(stack.api_pid, profile_dir and profile_dir / "api_load-submit.folded.txt"):
        out["submit"] = wrk(stack.api, "submit.lua", submit_args["submit"], load)
    engine = create_engine(stack.database_url)
    with engine.connect() as c:
        ids = [row[0] for row in c.execute(text("SELECT id FROM jobs ORDER BY random() LIMIT 2000"))]
        out["jobs_created"] = int(c.execute(text("SELECT count(*) FROM jobs")).scalar_one())
    engine.dispose()
    (work / "ids.txt").write_text("\n".join(ids) + "\n")
    out["bare_read"] = wrk(stack.bare, "read.lua", ["/bare/", str(work / "ids.txt"), ""], load)
    with py_spy(stack.api_pid, profile_dir and profile_dir / "api_load-read.folded.txt"):
        out["read"] = wrk(stack.api, "read.lua", ["/v1/jobs/", str(work / "ids.txt"), stack.key], load)
    return out


def prepare_state(redis_url: str) -> tuple[str, dict[str, str], str, Path]:
    """A fresh database with a tenant and the built-in generators, an empty Redis db: (db name, the
    ``CXRSYNTH_*`` environment of the servers, the tenant's key, a temp folder)."""
    import redis
    from sqlalchemy import create_engine, text

    from app.core.config import Settings
    from app.db.session import get_engine, get_sessionmaker, migrate
    from app.services.model_assets import ensure_builtin_generators
    from app.services.tenants import create_tenant

    db = f"cxrsynth_bench_{int(time.time())}_{os.getpid()}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{db}"'))
    admin.dispose()
    redis.Redis.from_url(redis_url).flushdb()
    tmp = Path(tempfile.mkdtemp(prefix="cxrsynth-bench-"))
    env = {"CXRSYNTH_DATABASE_URL": f"postgresql+psycopg://postgres@127.0.0.1:5432/{db}",
           "CXRSYNTH_BROKER_URL": redis_url, "CXRSYNTH_DATA_DIR": str(tmp),
           "CXRSYNTH_MAX_JOBS_IN_FLIGHT_PER_TENANT": str(10**9)}
    settings = Settings.model_validate({k.removeprefix("CXRSYNTH_").lower(): v for k, v in env.items()})
    migrate(settings.database_url)
    with get_sessionmaker(settings.database_url)() as s:
        ensure_builtin_generators(s, settings)
        _, key = create_tenant(s, "bench")
        s.commit()
    get_engine(settings.database_url).dispose()
    return db, env, key, tmp


def drop_state(db: str, redis_url: str) -> None:
    """Drop the benchmark's database and empty its Redis db."""
    import redis
    from sqlalchemy import create_engine, text

    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
    admin.dispose()
    redis.Redis.from_url(redis_url).flushdb()


def serve(app: str, env: dict[str, str], log: Any, workers: int, factory: bool = False, http: str = "auto",
          loop: str = "auto", root: Path = REPO_ROOT) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``uvicorn APP`` (code from ``root``) on a free port; (process, base URL)."""
    port = _free_port()
    cmd = [sys.executable, "-m", "uvicorn", app, "--port", str(port), "--log-level", "warning", "--no-access-log",
           "--workers", str(workers), "--http", http, "--loop", loop]
    if factory:
        cmd.append("--factory")
    proc = subprocess.Popen(cmd, env={**env, "PYTHONPATH": str(root)}, cwd=root, stdout=log, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Start the stack, run the phases, stop everything and drop the database."""
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install -y wrk")
    db, env_settings, key, tmp = prepare_state(args.redis)
    env = {**os.environ, **env_settings, "PYTHONUNBUFFERED": "1"}
    load = Load(args.concurrency, args.seconds, args.wrk_threads)
    with (tmp / "servers.log").open("wb") as log:
        api_proc, api = serve("app.main:create_app", env, log, args.workers, factory=True, http=args.http,
                              loop=args.loop, root=args.app_root)
        bare_proc, bare = serve("benchmarks.bare_app:app", env, log, args.workers, http=args.http, loop=args.loop)
        try:
            _wait(f"{api}/healthz", api_proc)
            _wait(f"{bare}/bare/x", bare_proc)
            stack = Stack(api, bare, key, api_proc.pid, env_settings["CXRSYNTH_DATABASE_URL"])
            return run_phases(stack, load, tmp, args.profile)
        finally:
            for proc in (api_proc, bare_proc):
                proc.terminate()
                proc.wait(20)
            drop_state(db, args.redis)
            shutil.rmtree(tmp, ignore_errors=True)


def report(res: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Print the table; the JSON payload."""
    rows = [("submit (POST /v1/generations)", res["submit"], res["bare_submit"]),
            ("status read (GET /v1/jobs/{id})", res["read"], res["bare_read"])]
    table = Table(title=f"API load (wrk), {args.concurrency} connections, {args.seconds:g} s per phase, "
                        f"{args.workers} uvicorn worker(s)")
    for col in ("operation", "cxrsynth req/s", "p50 ms", "p99 ms", "errors", "bare req/s", "bare p99 ms",
                "ratio req/s"):
        table.add_column(col)
    for name, ours, ref in rows:
        table.add_row(name, f"{ours['per_s']:.0f}", f"{ours['p50_ms']:.1f}", f"{ours['p99_ms']:.1f}",
                      str(ours["errors_total"]), f"{ref['per_s']:.0f}", f"{ref['p99_ms']:.1f}",
                      f"{ours['per_s'] / ref['per_s']:.2f}")
    Console().print(table)
    return {"load_generator": "wrk " + subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split()[1],
            "concurrency": args.concurrency, "seconds_per_phase": args.seconds, "uvicorn_workers": args.workers,
            "uvicorn_http": args.http, "uvicorn_loop": args.loop, "app_commit": _commit_of(args.app_root),
            "label": args.label, "results": res,
            "ratios": {"submit": res["submit"]["per_s"] / res["bare_submit"]["per_s"],
                       "read": res["read"]["per_s"] / res["bare_read"]["per_s"]},
            "stack": "Postgres 15 + Redis 7 broker + local object folder; uvicorn for each app",
            "profiles": {p.name: hot_functions(p) for p in sorted(args.profile.glob("api_load-*.folded.txt"))}
            if args.profile else None}


def compare_table(paths: list[Path]) -> str:
    """A markdown table of several runs' JSON (e.g. before and after a change), one row per run and operation."""
    lines = ["| run | app commit | server | operation | req/s | p50 ms | p99 ms | errors | API CPU ms/req | "
             "bare req/s | ratio |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for path in paths:
        doc = json.loads(path.read_text())
        res = doc["results"]
        server = (f"{doc.get('uvicorn_workers', 1)} worker(s), {doc.get('uvicorn_http', 'auto')}/"
                  f"{doc.get('uvicorn_loop', 'auto')}")
        name, app_commit = doc.get("label") or path.stem, doc.get("app_commit", doc.get("commit"))
        for op, bare in (("submit", "bare_submit"), ("read", "bare_read")):
            r, b = res[op], res[bare]
            cpu = r.get("cpu_ms_per_request", {}).get("app.main:create_app")
            lines.append(f"| {name} | {app_commit} | {server} | {op} | "
                         f"{r['per_s']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r.get('errors_total', 0)} | "
                         f"{'' if cpu is None else f'{cpu:.2f}'} | {b['per_s']:.0f} | {r['per_s'] / b['per_s']:.2f} |")
    return "\n".join(lines) + "\n"


def _commit_of(root: Path) -> str:
    return subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip() + ("" if root == REPO_ROOT else f" ({root})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each measured phase")
    parser.add_argument("--concurrency", type=int, default=16, help="open connections (closed loop)")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes of each app")
    parser.add_argument("--http", default="auto", choices=("auto", "h11", "httptools"),
                        help="uvicorn's HTTP parser for both apps (auto: httptools when installed)")
    parser.add_argument("--loop", default="auto", choices=("auto", "asyncio", "uvloop"),
                        help="uvicorn's event loop for both apps (auto: uvloop when installed)")
    parser.add_argument("--app-root", type=Path, default=REPO_ROOT,
                        help="a checkout whose app/ is served (e.g. a git worktree of an older commit, for a "
                             "before/after table); the database is set up with this checkout's code")
    parser.add_argument("--wrk-threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--profile", type=Path, nargs="?", const=RESULTS_DIR / "profiles", default=None,
                        help="py-spy the API during the submit and read phases (folder; default docs/results/profiles)")
    parser.add_argument("--label", default="", help="a word on what this run measures (e.g. before, after)")
    parser.add_argument("--json", type=Path, default=None, help="output (default docs/results/api_load.json)")
    parser.add_argument("--compare", type=Path, nargs="+", default=None, metavar="RESULT_JSON",
                        help="measure nothing: print the markdown table of these runs' JSON")
    args = parser.parse_args()
    if args.compare:
        print(compare_table(args.compare), end="")
        return
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    res = measure(args)
    payload = report(res, args)
    path = write_result("api_load", payload, args.json)
    print(json.dumps(payload["ratios"]), "->", path)


if __name__ == "__main__":
    main()
