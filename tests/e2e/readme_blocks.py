"""The README's shell blocks, for the tests that run them as written (``tests/e2e/test_readme_blocks.py``).

Every ```` ```bash ```` block of ``README.md`` has an HTML comment on the line right above its fence:

* ``<!-- readme-test: NAME -->``: a test runs it; that test is decorated with ``@runs_blocks("NAME")``;
* ``<!-- readme-test: NAME; not run here: REASON -->``: exempt, with the reason it cannot run on this
  machine (what can be checked offline is still checked).

``test_every_bash_block_is_run_or_exempt`` fails for a block with neither. Blocks are run by bash in a
scratch folder laid out like a checkout (:func:`workspace`), so relative paths in them (``.venv/bin/...``,
``../shared/data/...``, ``models/weights/...``) resolve as they do for a reader in the repository root.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from app.core.config import REPO_ROOT
from tests.support import DATA_DIR

README = REPO_ROOT / "README.md"
MARKER = re.compile(r"^<!-- readme-test: (?P<name>[a-z0-9-]+)(?:; not run here: (?P<reason>.*?))? -->$")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")

F = TypeVar("F", bound=Callable[..., object])

# block name -> the test that runs it (filled by @runs_blocks at import time)
RUN_BY: dict[str, str] = {}


@dataclass(frozen=True)
class Block:
    """One ```bash block: its name, the line of its opening fence, its code and, if exempt, why."""

    name: str | None
    line: int
    code: str
    exempt: str | None = None


def readme_blocks(text: str | None = None) -> list[Block]:
    """Every ```bash block of the README in order, named by the ``readme-test`` comment above it (or None)."""
    lines = (README.read_text() if text is None else text).splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        if lines[i].strip() != "```bash":
            i += 1
            continue
        above = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        m = MARKER.match(above)
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
        reason = m.group("reason") if m else None
        blocks.append(Block(m.group("name") if m else None, i + 1, "\n".join(lines[i + 1:end]) + "\n",
                            reason.strip() if reason is not None else None))
        i = end + 1
    return blocks


def block(name: str) -> Block:
    """The README block called ``name``."""
    found = [b for b in readme_blocks() if b.name == name]
    assert len(found) == 1, f"README has {len(found)} bash blocks named {name!r}"
    return found[0]


def script(*names: str) -> str:
    """The named blocks, in the order given, as one bash script (as a reader types them into one shell)."""
    return "".join(f"# --- README block {n!r} (line {block(n).line})\n{block(n).code}" for n in names)


def runs_blocks(*names: str) -> Callable[[F], F]:
    """Mark a test as the one that runs these README blocks (checked against the README's markers)."""
    def mark(fn: F) -> F:
        for name in names:
            assert name not in RUN_BY, f"README block {name!r} is run by {RUN_BY[name]} already"
            RUN_BY[name] = f"{fn.__module__}::{getattr(fn, '__name__', fn)}"
        return fn

    return mark


def workspace(root: Path, copy_models: tuple[str, ...] = ()) -> Path:
    """A scratch folder ``root/checkout`` that reads like the repository root to a README block.

    ``.venv`` is the virtual environment running the tests, ``models`` the repository's models (or a
    copy of the ``models/weights`` folders named in ``copy_models``, for a block that writes into
    them), and ``../shared/data`` the real data folder (``CXR_DATA_DIR``). What a block writes stays here.
    """
    work = root / "checkout"
    work.mkdir(parents=True)
    (work / ".venv").symlink_to(Path(sys.prefix))
    if copy_models:
        weights = work / "models" / "weights"
        weights.mkdir(parents=True)
        for entry in (REPO_ROOT / "models" / "weights").iterdir():
            if entry.name in copy_models:
                shutil.copytree(entry, weights / entry.name)
            else:
                (weights / entry.name).symlink_to(entry)
    else:
        (work / "models").symlink_to(REPO_ROOT / "models")
    for name in ("scripts", ".env.example"):
        (work / name).symlink_to(REPO_ROOT / name)
    (root / "shared").mkdir(exist_ok=True)
    (root / "shared" / "data").symlink_to(DATA_DIR)
    return work


def plain(text: str) -> str:
    """Terminal output as lines of text: escape sequences dropped, carriage returns as new lines."""
    return ANSI.sub("", text).replace("\r", "\n")


class BashRun:
    """``bash -euo pipefail`` running a script in its own process group, output to ``log``.

    ``-u`` makes an undefined variable (a placeholder nobody set) an error, ``-e`` any failing command.
    """

    def __init__(self, code: str, cwd: Path, env: dict[str, str], log: Path) -> None:
        self.log = log
        self._fh = log.open("wb")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(["bash", "-euo", "pipefail", "-c", code], cwd=cwd, env=env,
                                     stdin=subprocess.DEVNULL, stdout=self._fh, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def output(self) -> str:
        """Everything written so far, as plain text."""
        return plain(self.log.read_bytes().decode(errors="replace"))

    def tail(self, n: int = 6000) -> str:
        """The last ``n`` characters of the output, for failure messages."""
        return self.output()[-n:]

    def wait(self, timeout: float) -> int:
        """The exit status; on timeout the process group is killed and an AssertionError raised."""
        try:
            return self.proc.wait(timeout=max(1.0, timeout - (time.monotonic() - self.started)))
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.log.name}: did not finish in {timeout:.0f} s:\n{self.tail()}") from None

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        """The first match of ``pattern`` in the output; fails if the script ends or time runs out first."""
        rx = re.compile(pattern)
        deadline = self.started + timeout
        while True:
            m = rx.search(self.output())
            if m:
                return m
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.log.name}: ended (exit {self.proc.returncode}) before "
                                     f"{pattern!r}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.log.name}: no {pattern!r} within {timeout:.0f} s:\n{self.tail()}")
            time.sleep(0.5)

    def kill(self) -> None:
        """SIGTERM, then SIGKILL, to the whole process group (servers and workers the script started)."""
        for sig, grace in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(grace)
                break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # children that outlived the shell
        self._fh.close()


@contextlib.contextmanager
def bash(code: str, cwd: Path, env: dict[str, str], log: Path) -> Iterator[BashRun]:
    """Run ``code`` (see :class:`BashRun`); whatever it left running is killed on exit."""
    run = BashRun(code, cwd, env, log)
    try:
        yield run
    finally:
        run.kill()


def terminal_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` plus what makes rich draw its progress bars into a pipe, as it would on a terminal."""
    return {**env, "FORCE_COLOR": "1", "COLUMNS": "160", "PYTHONUNBUFFERED": "1"}
