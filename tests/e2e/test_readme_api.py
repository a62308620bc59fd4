"""The README's API block runs as written against a live embedded server (``cxrsynth serve``).

The block is executed by bash between its markers. Only the port is changed (to a free one), and it
runs in a scratch folder whose ``.venv`` points at this interpreter's, so ``synthetic.zip`` lands there.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

from app.core.config import REPO_ROOT
from tests.conftest import free_port
from tests.e2e.conftest import settings_env

pytestmark = pytest.mark.e2e

START, END = "<!-- api-block:start -->", "<!-- api-block:end -->"


def api_block() -> str:
    """The bash code between the README's API-block markers."""
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split(START, 1)[1].split(END, 1)[0]
    return section.split("```bash\n", 1)[1].rsplit("```", 1)[0]


def test_readme_api_block_runs_as_written(settings_factory: Any, tiny_generator: Path, tmp_path: Path) -> None:
    if shutil.which("jq") is None or shutil.which("curl") is None:
        pytest.fail("the README's API block needs curl and jq (Debian packages curl, jq)")
    port = free_port()
    script = api_block().replace("8000", str(port))
    assert "$JOB" in script and "$DATASET" in script and "$URL" in script
    work = tmp_path / "readme"
    work.mkdir()
    (work / ".venv").symlink_to(Path(sys.prefix))  # the virtual environment running these tests
    settings = settings_factory(tmp_path, stack="embedded", default_generator_dir=tiny_generator)
    env = settings_env(settings)
    env.pop("CXRSYNTH_PUBLIC_BASE_URL", None)  # serve sets it from --port, as for a user
    proc = subprocess.Popen(["bash", "-eo", "pipefail", "-c", script], cwd=work, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"the README API block did not finish in 300 s:\n{out[-4000:]}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # anything the block left behind
    assert proc.returncode == 0, out[-4000:]
    with zipfile.ZipFile(work / "synthetic.zip") as zf:
        names = zf.namelist()
    pngs = [n for n in names if n.endswith(".png")]
    assert len(pngs) == 16 and all("pneumonia/" in n for n in pngs), names
    assert any(n.endswith("manifest.csv") for n in names) and any(n.endswith("card.json") for n in names)
