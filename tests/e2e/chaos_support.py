"""Dedicated service processes for the chaos tests (``tests/e2e/test_chaos.py``): Redis, Postgres and
SeaweedFS that a test may stop and start again without touching the machine's shared services.

Each runs on free 127.0.0.1 ports with its data in its own folder, so :meth:`restart` (stop, then start on
the same port with the same data) is what an operator's ``systemctl restart`` or a container restart does.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from tests.support import S3Server, SeaweedProcess, free_port

PG_BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)


def _wait(pred: object, timeout_s: float, what: str, log: Path | None = None) -> None:
    """Poll ``pred()`` every 0.1 s until it is true; raise with the log's tail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return
        time.sleep(0.1)
    tail = log.read_text(errors="replace")[-3000:] if log is not None and log.is_file() else ""
    raise RuntimeError(f"{what} within {timeout_s:.0f}s\n{tail}")


class RedisProcess:
    """``redis-server`` on a free port, configured like production (``docker-compose.yml``: append-only
    file on), so a restart keeps the queued and unacknowledged messages as the production broker does."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log_path = workdir / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("redis-server") is not None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def answers(self) -> bool:
        import redis

        try:
            with redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=1) as client:
                return bool(client.ping())
        except redis.RedisError:
            return False

    def start(self) -> None:
        """Start the server and return once it answers PING (data loaded from the append-only file)."""
        cmd = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
               "--save", "", "--appendonly", "yes", "--appendfsync", "everysec", "--daemonize", "no"]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        _wait(self.answers, 30, "Redis did not answer", self.log_path)

    def stop(self) -> None:
        """SIGTERM (Redis flushes its append-only file and exits), SIGKILL after 10 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self, down_s: float = 0.0) -> None:
        """Stop, stay down ``down_s`` seconds, start again with the same data."""
        self.stop()
        time.sleep(down_s)
        self.start()


class PostgresProcess:
    """A private Postgres cluster (``initdb`` + ``pg_ctl``) on a free port, trust auth, socket in its folder.

    Postgres refuses to run as root: when we are root the cluster belongs to the ``postgres`` user and its
    commands run through ``runuser``; its folder is then made outside pytest's root-only temp tree.
    """

    def __init__(self) -> None:
        self.as_root = os.geteuid() == 0
        self.workdir = Path(tempfile.mkdtemp(prefix="cxrsynth-chaos-pg-"))
        self.data = self.workdir / "data"
        self.log_path = self.workdir / "postgres.log"
        self.port = free_port()
        if self.as_root:
            pw = pwd.getpwnam("postgres")
            os.chown(self.workdir, pw.pw_uid, pw.pw_gid)

    @staticmethod
    def available() -> bool:
        if not PG_BIN_DIRS or not (PG_BIN_DIRS[0] / "initdb").is_file():
            return False
        if os.geteuid() != 0:
            return True
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return False
        return shutil.which("runuser") is not None

    @property
    def admin_url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str, timeout_s: float = 60) -> None:
        cmd = [str(PG_BIN_DIRS[0] / tool), *args]
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True, timeout=timeout_s, stdin=subprocess.DEVNULL)

    def init(self) -> None:
        """``initdb`` the cluster (superuser ``postgres``, trust auth on the local socket and 127.0.0.1)."""
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                  "--no-sync", "--locale=C.UTF-8")

    def answers(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres",
                                 connect_timeout=1):
                return True
        except psycopg.Error:
            return False

    def start(self) -> None:
        """``pg_ctl start`` on the same port and data; returns once it accepts connections."""
        opts = (f"-p {self.port} -k {self.workdir} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c max_connections=200 -c shared_buffers=32MB")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log_path), "-o", opts, "-w", "-t", "60", "start",
                  timeout_s=90)
        _wait(self.answers, 30, "Postgres did not accept connections", self.log_path)

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop -m fast``: open sessions are ended, as ``systemctl restart postgresql`` does."""
        if (self.data / "postmaster.pid").is_file():
            self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop", timeout_s=90)

    def restart(self, down_s: float = 0.0) -> None:
        """Stop, stay down ``down_s`` seconds, start again with the same data."""
        self.stop()
        time.sleep(down_s)
        self.start()

    def create_database(self, name: str) -> str:
        """``CREATE DATABASE name``; returns its SQLAlchemy URL."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres",
                             autocommit=True, connect_timeout=5) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"

    def destroy(self) -> None:
        """Stop the server (immediately) and delete its folder."""
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self.stop(mode="immediate")
        shutil.rmtree(self.workdir, ignore_errors=True)


class RestartableSeaweed(SeaweedProcess):
    """:class:`tests.support.SeaweedProcess` that keeps its ports and data folder across a stop, so
    :meth:`restart` brings the same objects back at the same endpoint.

    A restarted master waits out a Raft election timeout (10 s by default) before it leads again; one
    second is plenty for a single master and keeps a restart at a few seconds. :meth:`stop` (inherited:
    SIGTERM, SIGKILL after 3 s) keeps the data folder; what the server acknowledged is in its files.
    """

    def __init__(self, binary: str, workdir: Path, access_key: str, secret_key: str) -> None:
        super().__init__(binary, workdir, access_key, secret_key)
        self.command += ["-master.electionTimeout=1s", "-volume.preStopSeconds=0"]

    def restart(self, timeout_s: float = 90.0) -> S3Server:
        """Stop, then start on the same ports with the same data."""
        self.stop()
        return self.start(timeout_s)
