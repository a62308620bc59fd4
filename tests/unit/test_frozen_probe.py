"""``benchmarks/frozen_probe.py``: the paired comparison of frozen encoders with raw pixels (the statistic,
the encoder arguments) and the ``smoke`` profile end to end (table and JSON; the "avg" arm is the paper
table's linear probe, and the readout-chosen arm chooses on validation)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from benchmarks import frozen_probe as fp

torch.set_num_threads(1)


def _fit(prob: np.ndarray, y: np.ndarray, files: list[str] | None = None) -> dict[str, Any]:
    return {"files": files or [f"{i}.png" for i in range(len(y))], "label": y.tolist(), "probability": prob.tolist()}


def test_paired_difference_is_zero_for_the_same_scores_and_positive_for_better_ones() -> None:
    rng = np.random.default_rng(0)
    y = np.array([0] * 40 + [1] * 60)
    noisy = y + rng.normal(0, 0.8, len(y))
    base = _fit(noisy, y)
    same = fp.paired_auc(base, base, seed=0)
    assert same["delta_auc"] == {"value": 0.0, "low": 0.0, "high": 0.0}
    better = fp.paired_auc(_fit(y + rng.normal(0, 0.2, len(y)), y), base, seed=0)
    assert better["delta_auc"]["low"] > 0 and better["auc"]["value"] > same["auc"]["value"]
    # the pairs share resamples: the difference's interval is narrower than the two AUCs' apart
    assert better["delta_auc"]["high"] - better["delta_auc"]["low"] < (same["auc"]["high"] - same["auc"]["low"]) + (
        better["auc"]["high"] - better["auc"]["low"])
    with pytest.raises(ValueError, match="different test images"):
        fp.paired_auc(_fit(noisy, y, [f"x{i}.png" for i in range(len(y))]), base, seed=0)


def test_combined_differences_may_be_negative() -> None:
    """Seeds combine as in the paper table, but a difference is bounded by [-1, 1], not [0, 1]: a losing
    encoder's negative difference must not be clipped to 0."""
    seeds = [{"auc": {"value": 0.9, "low": 0.85, "high": 0.95},
              "delta_auc": {"value": d, "low": d - 0.02, "high": d + 0.02}} for d in (-0.01, -0.03, -0.02)]
    out = fp.combine(seeds)
    assert out["delta_auc"]["value"] == pytest.approx(-0.02) and out["delta_auc"]["low"] < -0.03
    assert out["auc"]["n_seeds"] == 3


def test_encoder_arguments_fail_clearly(tmp_path: Path) -> None:
    assert fp.parse_encoders([], scratch=True) == {"scratch": "scratch"}
    with pytest.raises(SystemExit, match="expected NAME=DIR"):
        fp.parse_encoders(["nodir"], scratch=True)
    with pytest.raises(SystemExit, match="not an exported encoder folder"):
        fp.parse_encoders([f"x={tmp_path}"], scratch=True)
    with pytest.raises(SystemExit, match="given twice"):
        fp.parse_encoders([f"scratch={tmp_path}"], scratch=True)
    with pytest.raises(SystemExit, match="nothing to probe"):
        fp.parse_encoders([], scratch=False)


def test_smoke_run_writes_the_table(shared_data: Path, tmp_path: Path) -> None:
    if not (shared_data / "kermany-pneumonia").is_dir() or not (shared_data / "lung-seg").is_dir():
        pytest.skip("kermany-pneumonia or lung-seg missing from the shared data")
    doc = fp.main(["--profile", "smoke", "--fractions", "1", "--threads", "1", "--data-dir", str(shared_data),
                   "--run-dir", str(tmp_path / "run"), "--results-dir", str(tmp_path / "out"), "--name", "fp"])
    arms = ["raw-pixels", "raw-pixels, side chosen", "scratch, avg", "scratch, readout chosen"]
    assert [r["arm"] for r in doc["rows"]] == arms and all(r["seeds"] == 1 for r in doc["rows"])
    fits = {f["arm"]: f for f in doc["fits"]}
    assert fits["raw-pixels"]["delta_auc"] == {"value": 0.0, "low": 0.0, "high": 0.0}
    assert fits["raw-pixels"]["chosen"]["side"] == 32 and fits["raw-pixels, side chosen"]["chosen"]["side"] in (32, 64)
    assert fits["scratch, avg"]["chosen"].keys() == {"C"}
    assert fits["scratch, readout chosen"]["chosen"]["readout"] in {"avg", "grid2", "avg@2x", "grid2@2x"}
    for r in doc["rows"]:
        assert r["auc"]["low"] <= r["auc"]["value"] <= r["auc"]["high"]
    written = json.loads((tmp_path / "out" / "fp.json").read_text())
    assert written["commit"] and written["machine"]["cpu_count"] and written["command"].startswith("frozen_probe.py")
    md = (tmp_path / "out" / "fp.md").read_text()
    assert "| scratch, readout chosen |" in md and "Δ " in md and "Chosen on validation" in md

    # the "avg" arm is exactly the paper table's linear probe of the same encoder, seed and fraction
    from benchmarks.paper_table import PROFILES, Cell, run_cell

    cell = run_cell(PROFILES["smoke"], Cell("resnet18", "scratch", "classification", "linear", 1.0, 0), "scratch",
                    tmp_path / "run", "cpu", report_dir=tmp_path / "reports")
    table_auc = cell["metrics"]["auc"]["value"]  # torchmetrics computes it in float32
    assert table_auc == pytest.approx(fits["scratch, avg"]["auc"]["value"], abs=1e-6)
