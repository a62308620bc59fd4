"""Images/s of the pretraining loader streaming WebDataset shards, next to the folder loader, on real X-rays.

Builds shards (``--shard-size`` samples each: the stored JPEG, a ``.json`` label, a ``.cls``) from a seeded
sample of ``--n`` images of a data folder (default ``kermany-pneumonia``, 224 px grey JPEGs) under
``--workdir`` (outside the repository: the images are never committed), indexes them
(:func:`models.ssl.index_shards`, a walk of the tar headers) and times one pass of
:func:`models.ssl.data.pretraining_loader` over them: decode + resize to each ``--resolutions`` side with
``--workers`` DataLoader workers, ``--batch-size`` images per step, ``ceil(n / B)`` steps. The ``folder``
rows time the existing map-style path (:class:`models.ssl.data.FolderImages`, one file per image, decoded
lazily) on the same files. Rounds are interleaved and the median is reported.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ssl_stream.py --n 2000 --rounds 3

Writes ``docs/results/ssl_stream.json`` and ``.md`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch: workers inherit it

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import REPO_ROOT, RESULTS_DIR, write_result
from models.data.folders import ImageRecord, list_image_folder
from models.release.writers import TAR_MTIME, TAR_OWNER
from models.ssl.data import FolderImages, pretraining_loader
from models.ssl.shards import LocalShards, ShardIndex, index_shards
from models.ssl.stream import ShardStream

DATA_DIR = Path(os.environ.get("CXR_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))


def pick(folder: Path, n: int, seed: int) -> list[ImageRecord]:
    """A seeded sample of ``n`` images of ``folder`` (all labels), in file order."""
    records = list_image_folder(folder)
    keep = np.sort(np.random.default_rng(seed).choice(len(records), size=min(n, len(records)), replace=False))
    return [records[i] for i in keep]


def write_shards(records: list[ImageRecord], out: Path, shard_size: int) -> dict[str, Any]:
    """WebDataset shards of the stored image bytes, ``data-NNNNNN.tar`` under ``out``."""
    import webdataset as wds

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    labels = sorted({r.label or "unlabelled" for r in records})
    t0 = time.perf_counter()
    # As the dataset export writes them (models.release.writers): ustar members, one header each (a
    # float mtime, webdataset's default, adds a PAX header to every member and ~40% to the tar parsing).
    with wds.ShardWriter(str(out / "data-%06d.tar"), maxcount=shard_size, verbose=0, encoder=False,
                         mtime=TAR_MTIME, user=TAR_OWNER, group=TAR_OWNER) as writer:
        for i, rec in enumerate(records):
            label = rec.label or "unlabelled"
            ext = "jpg" if rec.path.suffix.lower() in (".jpg", ".jpeg") else rec.path.suffix.lower().lstrip(".")
            writer.write({"__key__": f"{i:06d}", ext: rec.path.read_bytes(),
                          "json": json.dumps({"label": label, "file": rec.path.name}).encode(),
                          "cls": str(labels.index(label)).encode()})
    shards = sorted(out.glob("*.tar"))
    return {"shards": len(shards), "shard_mb": round(sum(p.stat().st_size for p in shards) / 1e6, 1),
            "write_s": round(time.perf_counter() - t0, 2)}


def time_pass(dataset: Any, batch_size: int, steps: int, workers: int) -> dict[str, float]:
    """One pass of ``steps`` batches: total images/s (worker start-up included) and after the first batch."""
    loader = pretraining_loader(dataset, batch_size, seed=0, start_step=0, total_steps=steps, num_workers=workers)
    t0 = time.perf_counter()
    it = iter(loader)
    images = len(next(it))
    t_first = time.perf_counter()
    for batch in it:
        images += len(batch)
    total = time.perf_counter() - t0
    return {"seconds": total, "images": images, "images_per_s": images / total,
            "first_batch_s": t_first - t0, "steady_images_per_s": (images - batch_size) / (total - (t_first - t0))}


def measure(index: ShardIndex, records: list[ImageRecord], args: argparse.Namespace) -> list[dict[str, Any]]:
    steps = -(-index.num_samples // args.batch_size)
    configs = [(kind, res, w) for res in args.resolutions for w in args.workers for kind in ("shards", "folder")]
    runs: dict[tuple[str, int, int], list[dict[str, float]]] = {c: [] for c in configs}
    for _ in range(args.rounds):  # interleaved, so drift on the shared machine hits every row alike
        for kind, res, w in configs:
            dataset = (ShardStream(index, res) if kind == "shards"
                       else FolderImages([r.path for r in records], res))
            runs[(kind, res, w)].append(time_pass(dataset, args.batch_size, steps, w))
            print(kind, res, w, {k: round(v, 3) for k, v in runs[(kind, res, w)][-1].items()}, flush=True)
    rows = []
    for (kind, res, w), rs in runs.items():
        rows.append({"source": kind, "resolution": res, "num_workers": w, "images": int(rs[0]["images"]),
                     "images_per_s": round(statistics.median(r["images_per_s"] for r in rs), 1),
                     "steady_images_per_s": round(statistics.median(r["steady_images_per_s"] for r in rs), 1),
                     "first_batch_s": round(statistics.median(r["first_batch_s"] for r in rs), 3),
                     "rounds_images_per_s": [round(r["images_per_s"], 1) for r in rs]})
    return rows


def markdown(rows: list[dict[str, Any]], info: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        "# Streaming pretraining data from WebDataset shards (`benchmarks/ssl_stream.py`)", "",
        f"{info['n']:,} real chest X-rays (seeded sample of `{info['data']}`, 224x224 grey JPEG as stored) in "
        f"{info['shards']} shards of {args.shard_size} ({info['shard_mb']} MB), on local disk under `{args.workdir}`. "
        f"Indexing them (walking the tar headers, labels from `.json`) took {info['index_s']} s. "
        f"Each row is one pass of `pretraining_loader`: {args.batch_size} images per step, decode + resize "
        "(`resize_grey`, pad) to the resolution, DataLoader workers as given (0 = in the training process). "
        "*shards*: `ShardStream` (shard order permuted, 1000-sample shuffle buffer); *folder*: the map-style "
        "`FolderImages` path on the same JPEG files. Images/s counts the whole pass, worker start-up included; "
        f"*steady* excludes the first batch. Median of {args.rounds} interleaved rounds. The shard path also parses "
        "three tar members per sample (webdataset over Python's `tarfile`), which the folder path does not; its "
        "first batch waits for the shuffle buffer to fill.",
        "Machine: 2 shared CPU cores (other jobs were running), 1 torch/OpenMP thread per process. "
        "Raw numbers, command, commit and machine: `ssl_stream.json`.", "",
        "| source | resolution | workers | images | images/s | steady images/s | first batch s | rounds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['source']} | {r['resolution']} | {r['num_workers']} | {r['images']:,} | "
                     f"{r['images_per_s']:,} | {r['steady_images_per_s']:,} | {r['first_batch_s']} | "
                     f"{', '.join(str(x) for x in r['rounds_images_per_s'])} |")
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA_DIR / "kermany-pneumonia")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/cxr-ssl-stream"))
    parser.add_argument("--resolutions", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "ssl_stream.json")
    args = parser.parse_args()
    if REPO_ROOT in args.workdir.resolve().parents:
        raise SystemExit("--workdir must be outside the repository (the shards hold real images)")
    torch.set_num_threads(1)
    records = pick(args.data, args.n, args.seed)
    info: dict[str, Any] = {"data": args.data.name, "n": len(records)}
    info.update(write_shards(records, args.workdir / "shards", args.shard_size))
    t0 = time.perf_counter()
    index = index_shards(LocalShards(args.workdir / "shards"))
    info["index_s"] = round(time.perf_counter() - t0, 3)
    info["labels"] = index.labels
    rows = measure(index, records, args)
    md = markdown(rows, info, args)
    print(md)
    path = write_result("ssl_stream", {"setup": info, "batch_size": args.batch_size, "rounds": args.rounds,
                                       "rows": rows}, out=args.out)
    path.with_suffix(".md").write_text(md)


if __name__ == "__main__":
    main()
