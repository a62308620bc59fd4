"""The ``cxrsynth`` CLI: argument errors are clear and change nothing; ``generator-report`` writes its
JSON and grid for a tiny generator against a small real folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from app.cli import app

runner = CliRunner()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["generate", "--n", "0"], "n"),
        (["generate", "--counts", "normal8"], "label=n"),
        (["generate", "--counts", "normal=x"], "whole number"),
        (["generator-report", "--generator", "/nonexistent", "--real", "/tmp", "--json", "/tmp/x.json"],
         "not a generator folder"),
        (["jobs", "list"], "--api"),
    ],
)
def test_bad_arguments_fail_clearly(args: list[str], needle: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    if args[0] == "generate":
        args = [*args, "--out", str(out), "--generator", str(tmp_path)]
        (tmp_path / "cxrsynth.json").write_text("{}")
    result = runner.invoke(app, args)
    assert result.exit_code != 0
    assert needle in result.output
    assert not out.exists()


def test_generator_report_on_a_tiny_generator(tiny_generator: Path, shared_data: Path, tmp_path: Path) -> None:
    from models.data import load_pneumoniamnist, write_image_folder

    images, labels = load_pneumoniamnist(shared_data / "pneumoniamnist" / "pneumoniamnist_28.npz", "val")
    idx = np.concatenate([np.flatnonzero(labels == 0)[:20], np.flatnonzero(labels == 1)[:20]])
    real = write_image_folder(images[idx], labels[idx], tmp_path / "real", ["normal", "pneumonia"])
    out = tmp_path / "report.json"
    result = runner.invoke(app, ["generator-report", "--generator", str(tiny_generator), "--real", str(real),
                                 "--json", str(out), "--n", "16", "--sampler", "ddim", "--steps", "4"])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    rows = report["rows"]
    for name in ("synthetic_vs_real", "real_vs_real"):
        assert np.isfinite(rows[name]["fid"])
    assert out.with_suffix(".png").is_file()
