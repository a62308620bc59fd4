"""A large generation job end to end: images/s, CPU seconds per image, the privacy gate, the WebDataset export.

Runs the embedded CLI exactly as a user would, in child processes, against its own state folder
(``CXRSYNTH_DATA_DIR=--state``, outside the repository: the images are never committed)::

    cxrsynth generate --counts normal=..,pneumonia=.. --seed S --out OUT
    cxrsynth datasets export DATASET_ID --format webdataset --out EXPORT

then reads what the job recorded in the state's database (the embedded default, SQLite): the job's start and
finish, each shard's compute seconds (per-shard images/s), the released dataset's label counts and its
privacy report (candidates drawn, rejected, replaced). CPU seconds come from the children's ``rusage``.

    OMP_NUM_THREADS=2 CXRSYNTH_GENERATION_CPU_BF16=1 CXRSYNTH_MAX_IMAGES_PER_JOB=20000 \\
        .venv/bin/python benchmarks/generation_job.py --counts normal=5048,pneumonia=14952 --seed 20 \\
        --state /work/gen/state --out /work/gen/out --export /work/gen/syn.tar --name generation_job_20000

``--collect-only`` skips ``generate`` (a job already run with this ``--state``, e.g. started in the background
under GNU ``time -v -o LOG``: ``--time-log LOG`` then supplies the CPU seconds and the wall time) and does the
rest. Writes ``docs/results/<name>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import sqlite3
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import RESULTS_DIR, machine_line, write_result


def cli() -> str:
    """The ``cxrsynth`` entry point of this interpreter's environment."""
    path = Path(sys.executable).parent / "cxrsynth"
    if not path.exists():
        raise SystemExit(f"no cxrsynth next to {sys.executable}: install the project (pip install -e .)")
    return str(path)


def run_timed(cmd: list[str], env: dict[str, str]) -> dict[str, float]:
    """Run ``cmd`` to completion; its wall seconds and the CPU seconds its process tree used."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"wall_s": round(wall, 1), "cpu_user_s": round(after.ru_utime - before.ru_utime, 1),
            "cpu_sys_s": round(after.ru_stime - before.ru_stime, 1)}


def parse_time_log(path: Path) -> dict[str, float]:
    """Wall and CPU seconds from a GNU ``time -v`` log."""
    text = path.read_text()

    def field(label: str) -> str:
        m = re.search(rf"{re.escape(label)}:\s*(\S+)", text)
        if not m:
            raise SystemExit(f"{path}: no {label!r} line (not a GNU time -v log?)")
        return m.group(1)

    clock = [float(p) for p in field("Elapsed (wall clock) time (h:mm:ss or m:ss)").split(":")]
    wall = sum(v * 60 ** i for i, v in enumerate(reversed(clock)))
    return {"wall_s": round(wall, 1), "cpu_user_s": float(field("User time (seconds)")),
            "cpu_sys_s": float(field("System time (seconds)"))}


def _when(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def job_record(db: Path) -> dict[str, Any]:
    """The newest generation job of the state, its shards and its dataset, read from the database."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    con.row_factory = sqlite3.Row
    job = con.execute("select * from jobs where kind = 'generation' order by created_at desc limit 1").fetchone()
    if job is None:
        raise SystemExit(f"{db}: no generation job")
    shards = con.execute('select * from job_shards where job_id = ? order by "index"', (job["id"],)).fetchall()
    ds = con.execute("select * from datasets where source_job_id = ?", (job["id"],)).fetchone()
    con.close()
    started, finished = _when(job["started_at"]), _when(job["finished_at"])
    rates = [(s["stop"] - s["start"]) / s["compute_seconds"] for s in shards if s["compute_seconds"] > 0]
    q = statistics.quantiles(rates, n=10) if len(rates) >= 2 else [float("nan")] * 9
    out: dict[str, Any] = {
        "job_id": job["id"], "job_status": job["status"], "params": json.loads(job["params"]),
        "job_wall_s": round((finished - started).total_seconds(), 1) if started and finished else None,
        "job_compute_s": round(float(job["compute_seconds"]), 1),
        "shards": len(shards), "shard_attempts": sum(int(s["attempts"]) for s in shards),
        "shard_img_per_s": {"median": round(statistics.median(rates), 3), "p10": round(q[0], 3),
                            "p90": round(q[-1], 3)} if rates else None,
    }
    if ds is not None:
        out["dataset"] = {"id": ds["id"], "name": ds["name"], "status": ds["status"],
                          "num_images": ds["num_images"], "label_counts": json.loads(ds["label_counts"]),
                          "total_bytes": ds["total_bytes"], "gate_status": ds["gate_status"]}
        out["privacy_gate"] = json.loads(ds["privacy"]) if ds["privacy"] else None
    return out


def export_webdataset(dataset_id: str, out: Path, env: dict[str, str]) -> dict[str, Any]:
    """``cxrsynth datasets export ID --format webdataset``: its wall time and size."""
    timing = run_timed([cli(), "datasets", "export", dataset_id, "--format", "webdataset", "--out", str(out)], env)
    return {"format": "webdataset", "path": str(out), "bytes": out.stat().st_size, "wall_s": timing["wall_s"]}


def markdown(doc: dict[str, Any]) -> str:
    """The result as a short table."""
    gate = doc.get("privacy_gate") or {}
    counts = gate.get("counts", {})
    ds = doc.get("dataset", {})
    rows = [
        ("images released", f"{ds.get('num_images')} ({ds.get('label_counts')})"),
        ("job status", doc["job_status"]),
        ("wall time", f"{doc['wall_s']} s (job {doc['job_wall_s']} s)"),
        ("images/s (wall)", doc["img_per_s_wall"]),
        ("images/s per shard (median, p10, p90)",
         ", ".join(str(doc["shard_img_per_s"][k]) for k in ("median", "p10", "p90"))),
        ("CPU s per image", doc["cpu_s_per_image"]),
        ("shards (attempts)", f"{doc['shards']} ({doc['shard_attempts']})"),
        ("gate", f"{gate.get('status')}: {counts.get('rejected_candidates')} of {counts.get('candidates')} "
                 f"candidates rejected ({gate.get('rejection_rate')}), {counts.get('failed_images')} failed, "
                 f"{counts.get('exact_copies')} exact copies"),
        ("WebDataset export", f"{doc['export']['bytes'] / 1e6:.1f} MB in {doc['export']['wall_s']} s"
         if doc.get("export") else "not run"),
    ]
    head = [f"# Generation job: {ds.get('num_images')} images", "", f"- command: `{doc['command']}`",
            f"- commit: `{doc['commit']}`", f"- machine: {machine_line(doc['machine'])}",
            f"- threads / precision: OMP_NUM_THREADS={doc['env'].get('OMP_NUM_THREADS')}, "
            f"CXRSYNTH_GENERATION_CPU_BF16={doc['env'].get('CXRSYNTH_GENERATION_CPU_BF16')}",
            f"- params: {json.dumps(doc['params'])}", "", "| measure | value |", "|---|---|"]
    return "\n".join(head + [f"| {k} | {v} |" for k, v in rows]) + "\n"


def main() -> None:
    """Run (or collect) the job, export it, write the JSON and the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--counts", help="per-label counts for generate, e.g. normal=5048,pneumonia=14952")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--state", type=Path, required=True, help="CXRSYNTH_DATA_DIR of the run (outside the repo)")
    ap.add_argument("--out", type=Path, help="generate's --out folder")
    ap.add_argument("--generator", type=Path, help="generate's --generator (default: the shipped one)")
    ap.add_argument("--sampler", help="generate's --sampler (default: the generator's)")
    ap.add_argument("--steps", type=int, help="generate's --steps (default: the generator's)")
    ap.add_argument("--export", type=Path, help="write the WebDataset export here (skipped when absent)")
    ap.add_argument("--collect-only", action="store_true", help="generate already ran with this --state")
    ap.add_argument("--time-log", type=Path, help="with --collect-only: GNU time -v log of that run")
    ap.add_argument("--note", default="", help="free text for the record (e.g. what else ran on the machine)")
    ap.add_argument("--name", default="generation_job")
    ap.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = ap.parse_args()
    env = {**os.environ, "CXRSYNTH_DATA_DIR": str(args.state)}
    if args.collect_only:
        timing = parse_time_log(args.time_log) if args.time_log else {}
    else:
        if not (args.counts and args.out):
            ap.error("--counts and --out are needed unless --collect-only")
        extra = [arg for flag, value in (("--generator", args.generator), ("--sampler", args.sampler),
                                         ("--steps", args.steps)) if value is not None for arg in (flag, str(value))]
        timing = run_timed([cli(), "generate", "--counts", args.counts, "--seed", str(args.seed),
                            "--out", str(args.out), *extra], env)
    rec = job_record(args.state / "cxrsynth.db")
    if rec["job_status"] != "succeeded":
        raise SystemExit(f"job {rec['job_id']} is {rec['job_status']}")
    n = rec["dataset"]["num_images"]
    wall = timing.get("wall_s") or rec["job_wall_s"]
    cpu = timing.get("cpu_user_s", 0.0) + timing.get("cpu_sys_s", 0.0)
    payload: dict[str, Any] = {
        **timing, **rec, "wall_s": wall, "img_per_s_wall": round(n / wall, 3),
        "cpu_s_per_image": round(cpu / n, 3) if cpu else None,
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "CXRSYNTH_GENERATION_CPU_BF16",
                                                 "CXRSYNTH_MAX_IMAGES_PER_JOB")},
        "export": export_webdataset(rec["dataset"]["id"], args.export, env) if args.export else None,
        "note": args.note,
    }
    path = write_result(args.name, payload, args.results_dir / f"{args.name}.json")
    md = path.with_suffix(".md")
    md.write_text(markdown(json.loads(path.read_text())))
    print(md.read_text())


if __name__ == "__main__":
    main()
