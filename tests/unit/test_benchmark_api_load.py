"""The API load benchmark's own arithmetic: py-spy profile summaries and the before/after table."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.api_load import compare_table, hot_functions


def test_hot_functions_counts_each_function_once_per_sample_and_drops_idle_stacks(tmp_path: Path) -> None:
    folded = tmp_path / "p.folded.txt"
    folded.write_text(
        "process 1:\"uvicorn\";run (a.py:1);handle (app/x.py:10);query (db.py:5);query (db.py:7) 6\n"
        "process 1:\"uvicorn\";run (a.py:1);handle (app/x.py:12);dump (json.py:3) 2\n"
        "process 1:\"uvicorn\";run (a.py:1);select (selectors.py:9) 100\n")  # the idle event loop: dropped
    hot = {h["function"]: h["share"] for h in hot_functions(folded)}
    assert hot["handle (app/x.py)"] == 1.0
    assert hot["query (db.py)"] == 0.75  # two lines of one function in one stack count once
    assert hot["dump (json.py)"] == 0.25
    assert "select (selectors.py)" not in hot


def test_compare_table_has_one_row_per_run_and_operation(tmp_path: Path) -> None:
    def phase(per_s: float) -> dict[str, object]:
        return {"per_s": per_s, "p50_ms": 1.0, "p99_ms": 2.0, "errors_total": 0,
                "cpu_ms_per_request": {"app.main:create_app": 3.0}}

    doc = {"label": "after", "app_commit": "abc1234", "uvicorn_workers": 2, "uvicorn_http": "httptools",
           "uvicorn_loop": "uvloop", "results": {"submit": phase(100), "bare_submit": phase(400),
                                                 "read": phase(300), "bare_read": phase(600)}}
    path = tmp_path / "after.json"
    path.write_text(json.dumps(doc))
    rows = [r for r in compare_table([path, path]).splitlines() if r.startswith("| after")]
    assert len(rows) == 4
    assert rows[0].split("|")[4].strip() == "submit" and rows[0].endswith("| 400 | 0.25 |")
    assert rows[1].split("|")[4].strip() == "read" and rows[1].endswith("| 600 | 0.50 |")
