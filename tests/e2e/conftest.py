"""End-to-end fixtures: a tiny generator trained on PneumoniaMNIST, and real service processes
(uvicorn API, Celery workers) started with the settings of the real stack or the embedded default."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.core.config import REPO_ROOT, Settings
from tests.conftest import free_port


def wait_for(pred: Any, timeout: float, what: str, svc: Any, every: float = 0.5) -> Any:
    """Poll ``pred`` every ``every`` seconds until it returns something true (returned); fail with the
    services' log tails (``svc.logs_tail()``) if ``timeout`` passes first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}\n{svc.logs_tail()}")


def settings_env(settings: Settings, **extra: Any) -> dict[str, str]:
    """Environment that makes a child process build exactly these settings (``CXRSYNTH_*``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXRSYNTH_") or k.startswith("CXRSYNTH_TEST_")}
    for name, value in settings.model_dump().items():
        raw = getattr(settings, name)
        if value is None:
            continue
        text = raw.get_secret_value() if hasattr(raw, "get_secret_value") else str(value)
        env[f"CXRSYNTH_{name.upper()}"] = text
    for k, v in extra.items():
        env[f"CXRSYNTH_{k.upper()}"] = str(v)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Proc:
    """A child process with its log file; stopped (process group) at teardown."""

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path) -> None:
        self.cmd, self.log = cmd, log
        self._fh = log.open("ab")
        self.popen = subprocess.Popen(cmd, env=env, cwd=REPO_ROOT, stdout=self._fh, stderr=subprocess.STDOUT,
                                      start_new_session=True)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill9(self) -> None:
        """SIGKILL the whole process group (the worker and its children), as a crash would."""
        os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(10)

    def stop(self) -> None:
        if self.alive():
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(10)
        self._fh.close()

    def tail(self, n: int = 4000) -> str:
        return self.log.read_bytes()[-n:].decode(errors="replace")


class Services:
    """Starts API and worker processes for one settings object; everything stops at teardown."""

    def __init__(self, settings: Settings, logs: Path) -> None:
        self.settings = settings
        self.logs = logs
        self.procs: list[Proc] = []

    def env(self, **extra: Any) -> dict[str, str]:
        return settings_env(self.settings, **extra)

    def api(self) -> str:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        env = self.env(public_base_url=base)
        proc = Proc([sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory", "--host", "127.0.0.1",
                     "--port", str(port)], env, self.logs / f"api-{port}.log")
        self.procs.append(proc)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if not proc.alive():
                raise RuntimeError(f"API exited:\n{proc.tail()}")
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    return base
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"API did not answer in 60 s:\n{proc.tail()}")

    def worker(self, name: str = "w1", **extra: Any) -> Proc:
        cmd = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-Q", "gpu,cpu",
               "--pool", "solo", "--concurrency", "1", "--hostname", f"{name}@%h", "--loglevel", "INFO",
               "--without-gossip", "--without-mingle", "--without-heartbeat"]
        proc = Proc(cmd, self.env(**extra), self.logs / f"worker-{name}-{len(self.procs)}.log")
        self.procs.append(proc)
        return proc

    def cli(self, *args: str, **extra: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "app.cli", *args], env=self.env(**extra), cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=600)

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()

    def logs_tail(self) -> str:
        return "\n".join(f"--- {p.log.name}\n{p.tail()}" for p in self.procs)


@pytest.fixture
def services_factory(tmp_path: Path) -> Iterator[Any]:
    """``services_factory(settings) -> Services``; all processes stop at teardown."""
    made: list[Services] = []

    def make(settings: Settings) -> Services:
        logs = tmp_path / f"logs{len(made)}"
        logs.mkdir()
        svc = Services(settings, logs)
        made.append(svc)
        return svc

    yield make
    for svc in made:
        svc.stop()
