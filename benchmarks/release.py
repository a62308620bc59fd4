"""Dataset export throughput and peak memory: zip, WebDataset and DICOM for 1k, 10k and 100k images.

Each (format, N) runs in its own child process, so its peak resident set size (``ru_maxrss`` from
``os.wait4`` of that child) is its own. The claim to check: memory does not grow with N.

Two sources of images:

* ``library`` (default): the writers of :mod:`models.release` fed exactly as the service feeds them
  (a ``manifest.csv`` of N rows streamed from a temp file, one record per row), with image bytes taken
  from a pool of 16 real synthetic 64 px PNGs (the tiles of the shipped generator's ``samples.png``,
  i.e. its own output) instead of an object store, so 100k images need no 100k-object setup;
* ``store``: the service path, ``worker.exports.build_dataset_export`` on a local-folder store
  holding N PNG objects (written before the timer starts; N capped by ``--store-max``).

Throughput is images/s and MB/s (archive bytes written per second, and image bytes read per second).

    python benchmarks/release.py                         # N = 1k, 10k, 100k, all formats, library source
    python benchmarks/release.py --sizes 1000 10000 --formats zip --source store
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import REPO_ROOT, RESULTS_DIR, write_result

SAMPLES = REPO_ROOT / "models" / "weights" / "generator-kermany-64" / "samples.png"
LABELS = ("normal", "pneumonia")
MANIFEST_HEADER = ["file", "label", "sha256", "index", "seed", "sampler", "steps", "guidance", "generator_id"]


def image_pool() -> list[bytes]:
    """The 16 64 px tiles of the shipped generator's sample grid (2 rows x 8, 2 px padding), as PNGs."""
    from PIL import Image

    grid = Image.open(SAMPLES).convert("L")
    pool = []
    for r in range(2):
        for c in range(8):
            x, y = 2 + c * 66, 2 + r * 66
            buf = io.BytesIO()
            grid.crop((x, y, x + 64, y + 64)).save(buf, "PNG")
            pool.append(buf.getvalue())
    return pool


def write_manifest(path: Path, n: int, pool: list[bytes]) -> None:
    """A synthetic dataset's manifest of ``n`` rows (as the generation worker writes it), streamed."""
    import hashlib

    digests = [hashlib.sha256(p).hexdigest() for p in pool]
    with path.open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(MANIFEST_HEADER)
        for i in range(n):
            label = LABELS[i % 2]
            w.writerow([f"{label}/{i:07d}.png", label, digests[i % len(pool)], i, 1000 + i, "dpmsolver++", 20, 2.0,
                        "bench-generator"])


def _status_mib(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process from ``/proc/self/status``, in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux >= 4.0: write 5 to ``clear_refs``), so the peak measured
    afterwards is the export's own, not that of the imports before it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child(fmt: str, n: int, source: str, workdir: Path) -> dict[str, Any]:
    """One measurement in this (child) process; returns the figures as a dict."""
    try:
        import torch  # webdataset imports torch: keep its thread pool small on a shared machine

        torch.set_num_threads(1)
    except ImportError:
        pass
    import webdataset  # noqa: F401  (import cost outside the timer, as in a long-lived worker)

    from models.release import MANIFEST_FIELDS, CardInputs, ReleaseRecord, ReleaseSpec, iter_manifest, write_release

    pool = image_pool()
    manifest = workdir / "manifest.csv"
    write_manifest(manifest, n, pool)
    out = workdir / f"export-{fmt}"
    if source == "library":
        card = CardInputs(dataset_id="b" * 32, name="bench", origin="synthetic", num_images=n,
                          label_counts={"normal": (n + 1) // 2, "pneumonia": n // 2}, manifest_sha256="0" * 64)
        spec = ReleaseSpec(card=card, manifest_columns=MANIFEST_FIELDS, label_ids={"normal": 0, "pneumonia": 1})

        def records() -> Iterator[ReleaseRecord]:
            with manifest.open(newline="") as f:
                for row in iter_manifest(f):
                    assert row.index is not None
                    yield ReleaseRecord(row, functools.partial(pool.__getitem__, row.index % len(pool)))

        baseline, reset = _status_mib("VmRSS"), _reset_peak_rss()
        t0 = time.perf_counter()
        result = write_release(fmt, out, records(), spec)
        seconds = time.perf_counter() - t0
        archive, image_bytes = result.archive_bytes, result.image_bytes
    else:
        from app.db.orm import Dataset
        from app.storage.local import LocalStore
        from worker.exports import build_dataset_export

        store = LocalStore(workdir / "objects", secret="bench", base_url="http://x")
        prefix = "tenants/t/datasets/d/images"
        for i in range(n):
            store.put_bytes(f"{prefix}/{LABELS[i % 2]}/{i:07d}.png", pool[i % len(pool)], "image/png")
        store.put_file("tenants/t/datasets/d/manifest.csv", manifest, "text/csv")
        ds = Dataset(id="d", tenant_id="t", name="bench", origin="synthetic", status="ready", prefix=prefix,
                     num_images=n, label_counts={"normal": (n + 1) // 2, "pneumonia": n // 2},
                     manifest_key="tenants/t/datasets/d/manifest.csv", card={}, gate_status="passed")
        baseline, reset = _status_mib("VmRSS"), _reset_peak_rss()
        t0 = time.perf_counter()
        key = build_dataset_export(store, ds, fmt, read_workers=4)
        seconds = time.perf_counter() - t0
        archive = store.size(key)
        image_bytes = sum(len(pool[i % len(pool)]) for i in range(n))
    return {"format": fmt, "n": n, "source": source, "seconds": round(seconds, 3),
            "images_per_s": round(n / seconds, 1), "archive_mb": round(archive / 1e6, 2),
            "archive_mb_per_s": round(archive / 1e6 / seconds, 2),
            "image_mb_per_s": round(image_bytes / 1e6 / seconds, 2), "rss_before_export_mib": round(baseline, 1),
            "peak_rss_during_export_mib": round(_status_mib("VmHWM"), 1) if reset else None,
            "export_rss_growth_mib": round(_status_mib("VmHWM") - baseline, 1) if reset else None}


def run_child(fmt: str, n: int, source: str, timeout_s: float) -> dict[str, Any]:
    """Run :func:`child` in a fresh process; add that process's own peak RSS (``os.wait4`` rusage)."""
    workdir = Path(tempfile.mkdtemp(prefix="cxr-bench-release-"))
    cmd = [sys.executable, __file__, "--child", "--formats", fmt, "--sizes", str(n), "--source", source,
           "--workdir", str(workdir)]
    try:
        with (workdir / "stdout").open("w") as out, (workdir / "stderr").open("w") as err:
            proc = subprocess.Popen(cmd, stdout=out, stderr=err, env={**os.environ, "OMP_NUM_THREADS": "1"})
            timer = threading.Timer(timeout_s, proc.kill)
            timer.start()
            try:
                # wait4, not Popen.wait: it returns this child's own resource usage (peak RSS).
                _, status, usage = os.wait4(proc.pid, 0)
            finally:
                timer.cancel()
            proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode == -signal.SIGKILL:
            return {"format": fmt, "n": n, "source": source, "skipped": f"over the {timeout_s:.0f} s limit"}
        if proc.returncode != 0:
            raise RuntimeError(f"{fmt} n={n} failed:\n{(workdir / 'stderr').read_text()[-2000:]}")
        row: dict[str, Any] = json.loads((workdir / "stdout").read_text().strip().splitlines()[-1])
        row["process_peak_rss_mib"] = round(usage.ru_maxrss / 1024, 1)  # whole life, imports and exit included
        return row
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace, total_s: float) -> str:
    lines = [
        "# Dataset export throughput and memory (`benchmarks/release.py`)", "",
        "Each row is one child process writing one export. *Peak RSS during export* is the process's "
        "high-water mark reset just before the export (`/proc/self/clear_refs`) and read right after it; "
        "*growth* is that peak minus the RSS before the export (the imports, torch included via webdataset, "
        "are the ~0.5 GiB base). *Process peak* is `wait4`'s `ru_maxrss` of the whole child, interpreter "
        "start-up and exit included. Source "
        f"`{args.source}`: " + ("the `models.release` writers fed a streamed N-row manifest, image bytes from a "
                                "pool of 16 real 64 px synthetic PNGs (tiles of the shipped generator's "
                                "`samples.png`), no object store." if args.source == "library" else
                                "`build_dataset_export` on a local-folder store holding N PNG objects."),
        "Machine: 2 shared CPU cores (other jobs, including a training run, were running), 1 torch thread. "
        "Raw numbers, command, commit and machine: `release.json`.", "",
        "| format | N | seconds | images/s | archive MB | archive MB/s | image MB/s | RSS before export MiB "
        "| peak RSS during export MiB | growth MiB | process peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['format']} | {r['n']:,} | skipped: {r['skipped']} | | | | | | | | |")
            continue
        lines.append(f"| {r['format']} | {r['n']:,} | {r['seconds']} | {r['images_per_s']:,} | {r['archive_mb']} | "
                     f"{r['archive_mb_per_s']} | {r['image_mb_per_s']} | {r['rss_before_export_mib']} | "
                     f"{r['peak_rss_during_export_mib']} | {r['export_rss_growth_mib']} | "
                     f"{r['process_peak_rss_mib']} |")
    measured = [r for r in rows if "skipped" not in r and r.get("export_rss_growth_mib") is not None]
    if measured:
        worst = max(measured, key=lambda r: r["export_rss_growth_mib"])
        lines += ["", f"Largest RSS growth during an export: {worst['export_rss_growth_mib']} MiB ({worst['format']}, "
                      f"N = {worst['n']:,}); image data is never accumulated and the zip central directory is "
                      "spilled to disk, so the peak does not follow N."]
    lines += ["", "WebDataset archives are about twice the image bytes for 64 px images: each sample is three tar "
                  "members (`png`, `json`, `cls`) with a 512-byte header each, padded to 512 bytes.",
              "", f"Total wall time {total_s:.0f} s.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000])
    parser.add_argument("--formats", nargs="+", default=["zip", "webdataset", "dicom"],
                        choices=["zip", "webdataset", "dicom"])
    parser.add_argument("--source", choices=["library", "store"], default="library")
    parser.add_argument("--timeout", type=float, default=900.0, help="Seconds one measurement may take.")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "release.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.formats[0], args.sizes[0], args.source, args.workdir)))
        return
    rows = []
    t0 = time.perf_counter()
    for n in sorted(args.sizes):
        for fmt in args.formats:
            row = run_child(fmt, n, args.source, args.timeout)
            rows.append(row)
            print(json.dumps(row), flush=True)
    total = time.perf_counter() - t0
    md = markdown(rows, args, total)
    print(md)
    path = write_result("release", {"source": args.source, "rows": rows, "total_seconds": round(total, 1)},
                        out=args.out)
    path.with_suffix(".md").write_text(md)


if __name__ == "__main__":
    main()
