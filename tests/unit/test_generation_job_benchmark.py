"""``benchmarks/generation_job.py`` runs the embedded CLI end to end and reports what the job recorded."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import generation_job as bench

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TIME_LOG = """\tCommand being timed: "cxrsynth generate"
\tUser time (seconds): 2301.67
\tSystem time (seconds): 44.06
\tElapsed (wall clock) time (h:mm:ss or m:ss): 1:02:05.50
"""


def test_gnu_time_log_is_read(tmp_path: Path) -> None:
    log = tmp_path / "time.txt"
    log.write_text(TIME_LOG)
    assert bench.parse_time_log(log) == {"wall_s": 3725.5, "cpu_user_s": 2301.67, "cpu_sys_s": 44.06}
    log.write_text("not a time log")
    with pytest.raises(SystemExit, match="GNU time"):
        bench.parse_time_log(log)


def test_a_small_job_is_run_gated_exported_and_reported(tiny_generator: Path, tmp_path: Path) -> None:
    state, results = tmp_path / "state", tmp_path / "results"
    cmd = [sys.executable, str(Path(bench.__file__)), "--counts", "normal=3,pneumonia=5", "--seed", "4",
           "--state", str(state), "--out", str(tmp_path / "out"), "--export", str(tmp_path / "syn.tar"),
           "--generator", str(tiny_generator), "--sampler", "ddim", "--steps", "3", "--name", "gen_small",
           "--results-dir", str(results)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, env={**bench.os.environ, "OMP_NUM_THREADS": "1"})
    doc = json.loads((results / "gen_small.json").read_text())
    assert doc["job_status"] == "succeeded"
    assert doc["dataset"]["num_images"] == 8 and doc["dataset"]["label_counts"] == {"normal": 3, "pneumonia": 5}
    assert doc["shards"] >= 1 and doc["shard_img_per_s"]["median"] > 0
    assert doc["cpu_s_per_image"] > 0 and doc["img_per_s_wall"] == round(8 / doc["wall_s"], 3)
    gate = doc["privacy_gate"]["counts"]
    assert gate["images"] == 8 and gate["candidates"] >= 8
    assert doc["export"]["bytes"] == (tmp_path / "syn.tar").stat().st_size > 0
    assert "8 images" in (results / "gen_small.md").read_text()

    # --collect-only reads the same job back without generating again
    subprocess.run([sys.executable, str(Path(bench.__file__)), "--collect-only", "--state", str(state),
                    "--name", "again", "--results-dir", str(results)], check=True, capture_output=True)
    again = json.loads((results / "again.json").read_text())
    assert again["job_id"] == doc["job_id"] and again["export"] is None and again["wall_s"] == again["job_wall_s"]
