"""Every shell block of the README runs as written, and these tests run them.

Each ```bash block is named by a ``<!-- readme-test: NAME -->`` comment above it (``tests/e2e/readme_blocks.py``);
``test_every_bash_block_is_run_or_exempt`` fails for a block that no test here runs and that is not exempt
with a reason. The blocks run with ``bash -euo pipefail`` (a failing command or an unset variable, such as a
placeholder nobody defined, fails them) in a scratch folder laid out like the repository root, in sequence
as a reader types them. Only the environment differs from a reader's: settings (``CXRSYNTH_*``: a temporary
data folder, the tiny test generator as the default generator), and for the API session a free port in
place of 8000.

Long work is not run to the end: the README names the real sizes (a 224 px generator for 13,500 steps, the
privacy index of 5,016 images, a 20-epoch segmentation fine-tune), and the test asserts that the command
started correctly and made progress (a progress line of its own), then stops it. ``FORCE_COLOR`` makes the
commands' progress bars draw into the pipe as on a terminal.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.core.config import REPO_ROOT
from tests.conftest import free_port
from tests.e2e.conftest import settings_env
from tests.e2e.readme_blocks import (
    RUN_BY,
    BashRun,
    bash,
    block,
    plain,
    readme_blocks,
    runs_blocks,
    script,
    terminal_env,
    workspace,
)

pytestmark = pytest.mark.e2e


def _need_tools(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.fail(f"the README's shell blocks need {', '.join(missing)} (Debian packages curl, jq, zip, openssl)")


def _embedded_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """This process's environment (hermetic: no developer settings) with a fresh embedded data folder."""
    from os import environ

    env = {k: v for k, v in environ.items() if not (k.startswith("CXRSYNTH_") and not k.startswith("CXRSYNTH_TEST_"))}
    env.update(CXRSYNTH_DATA_DIR=str(tmp_path / "state"), PYTHONUNBUFFERED="1", **extra)
    return env


def _pngs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.png") if p.name != "privacy_report.png")


# --- the harness itself ----------------------------------------------------------------------------


def test_every_bash_block_is_run_or_exempt() -> None:
    """Each README bash block is run by a test here, or exempt with a reason; names are unique and current."""
    blocks = readme_blocks()
    assert len(blocks) >= 10, f"found only {len(blocks)} bash blocks in README.md"
    problems = []
    names = [b.name for b in blocks if b.name]
    problems += [f"two blocks are named {n!r}" for n in sorted({n for n in names if names.count(n) > 1})]
    for b in blocks:
        where = f"README.md:{b.line}"
        if b.name is None:
            problems.append(f"{where}: no `<!-- readme-test: NAME -->` comment above the block")
        elif b.exempt is not None:
            if len(b.exempt) < 20:
                problems.append(f"{where}: block {b.name!r} is exempt without a real reason ({b.exempt!r})")
            if b.name in RUN_BY:
                problems.append(f"{where}: block {b.name!r} is exempt but {RUN_BY[b.name]} runs it")
        elif b.name not in RUN_BY:
            problems.append(f"{where}: block {b.name!r} is run by no test and not exempt")
    problems += [f"{RUN_BY[n]} runs README block {n!r}, which does not exist" for n in sorted(set(RUN_BY) - set(names))]
    assert not problems, "\n".join(problems)
    assert [b.name for b in blocks if b.exempt is not None] == ["compose"], "only the Docker block may be exempt"


def test_harness_finds_unmarked_and_exempt_blocks() -> None:
    """The parser sees a block without a marker (so the check above would fail for it) and an exemption."""
    text = ("intro\n\n```bash\necho unmarked\n```\n\n<!-- readme-test: a -->\n```bash\necho a\n```\n"
            "<!-- readme-test: b; not run here: no docker engine on this machine -->\n\n```bash\ndocker ps\n```\n"
            "```python\nprint('not shell')\n```\n")
    found = readme_blocks(text)
    assert [(b.name, b.line, b.code, b.exempt) for b in found] == [
        (None, 3, "echo unmarked\n", None), ("a", 8, "echo a\n", None),
        ("b", 13, "docker ps\n", "no docker engine on this machine")]


# --- quick start and CI ----------------------------------------------------------------------------


def _ci_stage_lines(out: str) -> list[str]:
    return re.findall(r"^=== \[ci +\d+s\] (.*)$", out, flags=re.MULTILINE)


def _args(pid: int | str) -> list[str]:
    return [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]]


def ci_run_ancestor() -> int | None:
    """The pid of the ``bash .ci/run`` of this checkout that (indirectly) started this test process, if any."""
    pid = os.getppid()
    while pid > 1:
        try:
            args, cwd = _args(pid), Path(os.readlink(f"/proc/{pid}/cwd"))
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return None
        if len(args) >= 2 and Path(args[0]).name == "bash" and (cwd / args[-1]).resolve() == REPO_ROOT / ".ci" / "run":
            return pid
        pid = ppid
    return None


@runs_blocks("quick-start", "tests")
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quick_start_and_ci_command(tiny_generator: Path, tmp_path: Path) -> None:
    """The quick start runs as written in the repository root: ``pip install -e`` of this checkout into its
    ``.venv``, ``cxrsynth generate`` (the default generator is the tiny test one, by setting), ``bash .ci/run``.

    ``bash .ci/run`` (and with it block ``tests``, the pytest command it runs verbatim) is the CI that runs
    this suite. Under it (this process descends from it, as the README's pytest command), the line is being
    executed right now, past install, services, lint and types; running it again would run this test again.
    Elsewhere it runs here with ``PYTEST_ADDOPTS=--collect-only``: it installs, checks the services, lints,
    type-checks and collects the suite without running it a second time."""
    tests_command = block("tests").code.strip()
    assert tests_command in (REPO_ROOT / ".ci" / "run").read_text().splitlines(), tests_command
    venv_version = (REPO_ROOT / ".venv" / "pyvenv.cfg").read_text()
    python3 = subprocess.run(["python3", "-c", "import platform; print(platform.python_version())"],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert f"version = {python3}\n" in venv_version, (
        f"python3 is {python3} but .venv was made by another Python; `python3 -m venv .venv` would replace it")
    code = script("quick-start")
    under_ci = ci_run_ancestor()
    if under_ci is not None:
        assert code.rstrip().endswith("\nbash .ci/run"), code
        code = code.rstrip().removesuffix("bash .ci/run") + "# bash .ci/run: the process running this test\n"
        assert _args("self")[1:] == tests_command.split()[1:], (_args("self"), tests_command)
    out_dir = REPO_ROOT / "out"
    had_out = out_dir.exists()
    started = time.time()
    env = _embedded_env(tmp_path, CXRSYNTH_DEFAULT_GENERATOR_DIR=str(tiny_generator),
                        PYTEST_ADDOPTS="--collect-only -q -p no:cacheprovider")
    try:
        with bash(code, REPO_ROOT, env, tmp_path / "quick-start.log") as run:
            rc = run.wait(840)
            out = run.output()
        assert rc == 0, out[-6000:]
        manifest = out_dir / "manifest.csv"
        assert manifest.stat().st_mtime >= started - 1, "cxrsynth generate did not write out/manifest.csv"
        assert len(manifest.read_text().splitlines()) == 17, manifest.read_text()[:2000]
        assert re.search(r"16 images in out", out), out[-4000:]
        if under_ci is not None:
            return
        stages = _ci_stage_lines(out)
        for stage in ("install (.venv, pip install -e '.[dev]')", "services (Postgres, Redis)", "ruff check .",
                      "mypy app worker models", "tests", "tests passed"):
            assert stage in stages, (stage, stages)
        # -q twice (the command's and PYTEST_ADDOPTS'): collect-only prints "FILE: COUNT" per test file
        collected = dict(re.findall(r"^(tests/\S+\.py): (\d+)$", out, flags=re.MULTILINE))
        assert sum(map(int, collected.values())) > 100, out[-3000:]
        assert "tests/e2e/test_readme_blocks.py" in collected, sorted(collected)
    finally:
        if not had_out:
            shutil.rmtree(out_dir, ignore_errors=True)


# --- the API session -------------------------------------------------------------------------------


@runs_blocks("api", "generators-api", "release")
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_api_session(settings_factory: Any, tiny_generator: Path, tmp_path: Path) -> None:
    """The API blocks, in order, in one shell: ``serve`` in the background, a generation downloaded as a
    zip, a dataset uploaded, a generator trained on it and used, the admin review, exports in two
    formats, and ``kill %1`` at the end."""
    _need_tools("curl", "jq", "zip", "openssl")
    port = free_port()
    code = script("api", "generators-api", "release").replace("8000", str(port))
    work = workspace(tmp_path)
    settings = settings_factory(tmp_path, stack="embedded", default_generator_dir=tiny_generator)
    env = settings_env(settings)
    env.pop("CXRSYNTH_PUBLIC_BASE_URL", None)  # serve sets it from --port, as for a reader
    with bash(code, work, env, tmp_path / "api-session.log") as run:
        rc = run.wait(840)
        out = run.output()
    assert rc == 0, out[-6000:]
    # block "api": 16 pneumonia PNGs with manifest and card
    with zipfile.ZipFile(work / "synthetic.zip") as zf:
        names = zf.namelist()
    pngs = [n for n in names if n.endswith(".png")]
    assert len(pngs) == 16 and all("pneumonia/" in n for n in pngs), names
    assert any(n.endswith("manifest.csv") for n in names) and any(n.endswith("card.json") for n in names)
    # block "generators-api": 32 Kermany images uploaded, a generator trained, a generation accepted, a link
    with zipfile.ZipFile(work / "site.zip") as zf:
        assert len([n for n in zf.namelist() if n.endswith(".jpeg")]) == 32
    assert re.search(r"job \w+: succeeded", out), out[-6000:]
    docs = _json_objects(out)
    assert any(d.get("kind") == "generation" and d.get("status") in ("queued", "running") for d in docs), docs
    assert any(str(d.get("url", "")).startswith(f"http://127.0.0.1:{port}/") and "site-32" in str(d.get("filename"))
               for d in docs), docs
    # block "release": the admin sees the passed gate; the override answers 409 gate-passed; two exports
    assert {"gate_status": "passed", "gate_override": None} in docs, docs
    assert any(d.get("status") == 409 and "gate-passed" in str(d.get("type")) for d in docs), docs
    exports = sorted(p.name for p in (work / "out").iterdir())
    assert any(n.endswith("-dicom.zip") for n in exports), exports
    assert any(n.endswith("-webdataset.tar") for n in exports), exports


def _json_objects(text: str) -> list[dict[str, Any]]:
    """The JSON objects a transcript holds, one per line or pretty-printed (jq)."""
    found: list[dict[str, Any]] = []
    decoder = json.JSONDecoder()
    i = 0
    while (i := text.find("{", i)) != -1:
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            i += 1
            continue
        if isinstance(obj, dict):
            found.append(obj)
        i = end
    return found


# --- commands without a service ------------------------------------------------------------------


@runs_blocks("generate-64", "privacy-check", "encoders")
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_cli_session(tmp_path: Path) -> None:
    """The embedded commands, in order in one shell: 16 images from the shipped 64 px generator, their
    privacy check against Kermany, an encoder pretrained on them and evaluated on a patient-level split.
    The last command (a 20-epoch segmentation fine-tune, long on a CPU) must start and report progress."""
    work = workspace(tmp_path)
    code = script("generate-64", "privacy-check", "encoders")
    with bash(code, work, terminal_env(_embedded_env(tmp_path)), tmp_path / "cli-session.log") as run:
        run.wait_for(r"segmentation epoch 1/20 loss \d", timeout=780)
        out = run.output()
    assert len(_pngs(work / "out64")) == 16 and (work / "out64" / "manifest.csv").is_file(), out[-4000:]
    report = json.loads((work / "privacy.json").read_text())
    assert report["counts"]["images"] == 16 and report["status"] in ("passed", "failed"), report
    assert (work / "privacy.png").is_file()
    config = json.loads((work / "enc" / "config.json").read_text())
    assert config["method"] == "simclr" and config["resolution"] == 64, config
    assert (work / "enc" / "model.safetensors").is_file()
    cls = json.loads((work / "cls.json").read_text())
    assert cls["task"] == "classification" and cls["split"]["test"] > 0 and "auc" in cls["metrics"], cls
    for side in ("train", "test"):
        assert any((work / "kermany" / side / "NORMAL").iterdir()) and any((work / "lungs" / side / "masks").iterdir())


@runs_blocks("multi-gpu")
@pytest.mark.timeout(600)
def test_multi_gpu_session(tmp_path: Path) -> None:
    """The torchrun block after the 16 images of ``generate-64``: DINO on 2 processes of this machine, then a
    generator trained by two "machines" (two launches on this one) meeting at a c10d rendezvous."""
    work = workspace(tmp_path)
    code = script("generate-64", "multi-gpu")
    with bash(code, work, terminal_env(_embedded_env(tmp_path)), tmp_path / "multi-gpu.log") as run:
        assert run.wait(timeout=540) == 0, run.tail()
    config = json.loads((work / "enc-ddp" / "config.json").read_text())
    assert config["method"] == "dino" and config["pretraining"]["steps"] == 4, config
    meta = json.loads((work / "gen-ddp" / "cxrsynth.json").read_text())
    assert meta["resolution"] == 32, meta
    logs = plain((work / "node-A.log").read_text() + (work / "node-B.log").read_text())
    # exactly one of the two launches held rank 0 and wrote the generator
    assert logs.count("trained a pixel generator") == 1 and logs.count("the machine of rank 0 wrote") == 1, logs


# --- long work: started correctly and made progress ------------------------------------------------


@runs_blocks("train-224", "privacy-index")
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_long_blocks_start_and_make_progress(tmp_path: Path) -> None:
    """Both long blocks run side by side until each prints a progress line of real work: the 224 px
    generator an autoencoder step (its loss), the privacy index its first block of training-image features.
    ``privacy-index`` writes into the generator folder it is given: here a copy of the shipped one."""
    runs: list[tuple[str, Path, BashRun]] = []
    try:
        for name, pattern, copy in (("train-224", r"autoencoder: loss \d+\.\d+ l1", ()),
                                    ("privacy-index", r"features \d+/5016", ("generator-kermany-64",))):
            work = workspace(tmp_path / name, copy_models=copy)
            env = terminal_env(_embedded_env(tmp_path / name))
            runs.append((pattern, work, BashRun(script(name), work, env, tmp_path / f"{name}.log")))
        for pattern, _work, run in runs:
            run.wait_for(pattern, timeout=240)
    finally:
        for _pattern, _work, run in runs:
            run.kill()
    shipped = REPO_ROOT / "models" / "weights" / "generator-kermany-64"
    copied = runs[1][1] / "models" / "weights" / "generator-kermany-64"
    assert not copied.is_symlink(), "privacy-index must write into a copy, never into the shipped generator"
    assert (copied / "cxrsynth.json").read_bytes() == (shipped / "cxrsynth.json").read_bytes()


# --- exempt: Docker Compose, checked offline ---------------------------------------------------------


def test_compose_block_offline(tmp_path: Path) -> None:
    """The compose block cannot run here (no Docker engine, no registry); what it relies on is checked: its
    first line runs as written, every service it names is in docker-compose.yml (whose settings
    ``tests/unit/test_compose.py`` checks), and the command it runs in the api container is a working
    ``cxrsynth`` command (run here on the embedded service)."""
    lines = [ln.split("#", 1)[0].strip() for ln in block("compose").code.splitlines()]
    lines = [ln for ln in lines if ln]
    assert lines[0] == "cp .env.example .env"
    work = workspace(tmp_path)
    with bash(lines[0], work, _embedded_env(tmp_path), tmp_path / "compose.log") as run:
        assert run.wait(30) == 0, run.output()
    assert (work / ".env").read_text() == (REPO_ROOT / ".env.example").read_text()
    services = set(yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"])
    exec_command: list[str] = []
    for line in lines[1:]:
        words = line.split()
        assert words[:2] == ["docker", "compose"], line
        if words[2] == "exec":
            assert words[3] in services, line
            exec_command = re.findall(r'"[^"]*"|\S+', line.split(None, 4)[4])
        elif words[2] == "logs":
            assert words[-1] in services, line
        else:
            assert words[2] in ("build", "up"), line
    assert exec_command[:3] == ["cxrsynth", "tenants", "create"], exec_command
    assert "cxrsynth" in (REPO_ROOT / "Dockerfile").read_text()
    args = [a.strip('"') for a in exec_command[1:]]
    done = subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=REPO_ROOT, env=_embedded_env(tmp_path),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.fullmatch(r"\S{20,}", done.stdout.strip()), done.stdout  # the API key, alone on stdout
