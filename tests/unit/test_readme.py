"""README stays true: its configuration table is generated from Settings, its test command is CI's."""

from __future__ import annotations

import re

from app.core.config import REPO_ROOT
from scripts.settings_table import settings_table, table_in

README = (REPO_ROOT / "README.md").read_text()
CI_RUN = (REPO_ROOT / ".ci" / "run").read_text()


def test_settings_table_is_generated_from_settings() -> None:
    assert table_in(README) == settings_table(), (
        "README's configuration table is out of date: run "
        "`.venv/bin/python scripts/settings_table.py --write README.md`"
    )


def test_readme_test_command_is_what_ci_runs() -> None:
    commands = re.findall(r"^(\S*python -m pytest.*)$", README, flags=re.MULTILINE)
    assert commands, "README names no pytest command"
    for command in commands:
        assert command.strip() in CI_RUN.splitlines(), f"{command!r} is not a line of .ci/run"


def test_quick_start_is_at_the_top() -> None:
    box = README.split("```", 2)[1]
    assert "pip install -e '.[dev]'" in box and "cxrsynth generate --n 16 --out out/" in box
    assert "bash .ci/run" in box
