"""``cxrsynth serve`` and its embedded worker live and die together (real processes, real signals).

Before the fix, SIGTERM (what kill, systemd and docker send) stopped the API but left its Celery worker
running with parent 1, holding the embedded database and consuming the embedded queue.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port
from tests.e2e.conftest import Proc, wait_for
from tests.e2e.test_end_to_end import _up

pytestmark = pytest.mark.e2e


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _start_serve(settings_factory: Any, services_factory: Any, tiny_generator: Path,
                 tmp_path: Path) -> tuple[Proc, int, Any]:
    """``cxrsynth serve`` on a free port; returns the process, its worker's pid and the services."""
    settings = settings_factory(tmp_path, stack="embedded", default_generator_dir=tiny_generator)
    svc = services_factory(settings)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = Proc([sys.executable, "-m", "app.cli", "serve", "--port", str(port)], svc.env(public_base_url=base),
                tmp_path / "serve.log")
    svc.procs.append(proc)
    wait_for(lambda: _up(base), 60, "serve to answer", svc)
    found = wait_for(lambda: re.search(r"worker started \(pid (\d+)\)", proc.tail(20000)), 30, "the worker pid", svc)
    worker_pid = int(found.group(1))
    assert _pid_alive(worker_pid), proc.tail()
    return proc, worker_pid, svc


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_worker_stops_with_the_server(sig: signal.Signals, settings_factory: Any, services_factory: Any,
                                      tiny_generator: Path, tmp_path: Path) -> None:
    proc, worker_pid, svc = _start_serve(settings_factory, services_factory, tiny_generator, tmp_path)
    time.sleep(2)  # let the worker finish booting, as a real deployment would have
    os.kill(proc.popen.pid, sig)  # the server process only, as `kill PID` does
    proc.popen.wait(60)
    wait_for(lambda: not _pid_alive(worker_pid), 45, f"the worker to exit after {sig.name}", svc)
    assert "embedded state" in proc.tail(20000) and "celery@" not in proc.tail(20000)  # no banner


def test_worker_exits_when_the_server_is_killed(settings_factory: Any, services_factory: Any,
                                                tiny_generator: Path, tmp_path: Path) -> None:
    proc, worker_pid, svc = _start_serve(settings_factory, services_factory, tiny_generator, tmp_path)
    time.sleep(2)
    os.kill(proc.popen.pid, signal.SIGKILL)  # no chance to stop its child: the worker must notice itself
    proc.popen.wait(10)
    wait_for(lambda: not _pid_alive(worker_pid), 45, "the orphaned worker to exit", svc)
