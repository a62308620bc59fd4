"""Training steps/s on 1 and on N processes (torchrun, DDP) at the same global batch, side by side.

Each workload runs through :func:`models.launch.launch` with 1 and then N ranks (gloo on CPU, NCCL on
GPUs), rounds interleaved: 1, N, 1, N, ... The rate is the steps over rank 0's training-loop wall time (its
result record), so process start, rendezvous, data loading and model building are left out; on CPU
every run shares the same cores (1 rank: all the threads; N ranks: cores / N threads each), so on a 2-core
machine the expected ratio is about 1x: the figure checks the cost of the gradient all-reduce, not a
speed-up. On a machine with several GPUs (``--device cuda``) the same command records the GPU scaling.

Workloads (``--workloads``):

* ``generator``: the pixel UNet of ``TrainingConfig`` at ``--resolution`` (64 px), global batch 16;
* ``simclr``: SimCLR on ResNet-18 at 64 px, global batch 32 (the ``cpu-12`` paper-table recipe);
* ``dino``: DINO on ResNet-18 at 64 px (2 global + 6 local crops of 32 px), global batch 32.

    .venv/bin/python benchmarks/ddp_scaling.py --nproc 2 --steps 40 --rounds 2

Writes ``docs/results/ddp_scaling.json`` and ``.md`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks._common import RESULTS_DIR, write_result  # noqa: E402
from models.launch import launch, make_spec  # noqa: E402
from models.torchrun import LaunchOptions  # noqa: E402

WORKLOADS = ("generator", "simclr", "dino")


def _data(root: Path, n: int, size: int = 64) -> Path:
    """``n`` real Kermany images (symlinks) when the shared data is there, else smooth random images."""
    import numpy as np
    from PIL import Image

    kermany = REPO.parent / "shared" / "data" / "kermany-pneumonia"
    for label in ("NORMAL", "PNEUMONIA"):
        (root / label).mkdir(parents=True, exist_ok=True)
    if kermany.is_dir():
        for label in ("NORMAL", "PNEUMONIA"):
            for f in sorted((kermany / label).iterdir())[: n // 2]:
                (root / label / f.name).symlink_to(f)
        return root
    rng = np.random.default_rng(0)
    for i in range(n):
        low = rng.integers(0, 255, (size // 8, size // 8), dtype=np.uint8)
        label = ("NORMAL", "PNEUMONIA")[i % 2]
        Image.fromarray(low).resize((size, size), Image.Resampling.BILINEAR).save(root / label / f"{i}.png")
    return root


def _spec(workload: str, data: Path, steps: int, resolution: int, work: Path, device: str) -> dict[str, Any]:
    if workload == "generator":
        from models.diffusion.config import TrainingConfig

        unet = TrainingConfig(resolution=resolution, max_steps=steps, batch_size=16, checkpoint_every=10**6)
        return make_spec("train_generator", data=data, out_dir=None, config=unet.to_dict(),
                         checkpoint_dir=work / "ckpt", resume=False, device=device)
    from models.ssl.config import PretrainConfig

    config = PretrainConfig(method=cast(Any, workload), backbone="resnet18", resolution=64, max_steps=steps,
                            batch_size=32, warmup_steps=1, checkpoint_every=10**6)
    return make_spec("pretrain", data=data, out_dir=None, config=config.to_dict(), checkpoint_dir=work / "ckpt",
                     resume=False, device=device)


def time_run(spec: dict[str, Any], nproc: int, run_dir: Path) -> dict[str, Any]:
    """Steps/s of one launch: the steps over the training loop's wall time on rank 0's clock (process start,
    rendezvous, data loading and model building are outside it)."""
    t0 = time.perf_counter()
    record = launch(spec, LaunchOptions(nproc_per_node=nproc), run_dir)
    wall = time.perf_counter() - t0
    assert record is not None
    rate = record["steps"] / record["wall_seconds"]
    return {"nproc": nproc, "steps_per_s": round(rate, 3), "steps": record["steps"],
            "loop_s": round(record["wall_seconds"], 2), "launch_wall_s": round(wall, 1),
            "final_loss": record["final_loss"], "world_size": record["world_size"]}


def _table(rows: list[dict[str, Any]], nproc: int) -> str:
    lines = [f"| workload | global batch | 1 process steps/s | {nproc} processes steps/s | ratio {nproc}/1 |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['workload']} | {r['global_batch']} | {r['one']:.3f} | {r['many']:.3f} | "
                     f"{r['ratio']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run the comparison and write the JSON and Markdown."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=40, help="optimiser steps per run")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--resolution", type=int, default=64, help="generator resolution")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    workloads = [w for w in args.workloads.split(",") if w]
    unknown = set(workloads) - set(WORKLOADS)
    if unknown:
        raise SystemExit(f"unknown workloads {sorted(unknown)}; choose from {WORKLOADS}")
    rows, runs = [], []
    with tempfile.TemporaryDirectory(prefix="ddp-scaling-") as tmp:
        data = _data(Path(tmp) / "data", args.images)
        for workload in workloads:
            rates: dict[int, list[float]] = {1: [], args.nproc: []}
            for r in range(args.rounds):
                for nproc in (1, args.nproc):
                    work = Path(tmp) / f"{workload}-{nproc}-{r}"
                    spec = _spec(workload, data, args.steps, args.resolution, work, args.device)
                    result = time_run(spec, nproc, work / "run")
                    print(f"{workload} nproc={nproc} round {r}: {result['steps_per_s']:.3f} steps/s", flush=True)
                    runs.append({"workload": workload, "round": r, **result})
                    rates[nproc].append(result["steps_per_s"])
            one, many = statistics.median(rates[1]), statistics.median(rates[args.nproc])
            batch = 16 if workload == "generator" else 32
            rows.append({"workload": workload, "global_batch": batch, "one": one, "many": many, "ratio": many / one})
    payload = {"nproc": args.nproc, "device": args.device, "steps": args.steps,
               "rounds": args.rounds, "rows": rows, "runs": runs,
               "note": "medians over interleaved rounds; CPU runs share the same cores (1 rank: all threads; "
                       "N ranks: cores / N threads each)"}
    out = args.out or RESULTS_DIR / "ddp_scaling.json"
    path = write_result("ddp_scaling", payload, out)
    md = (f"# Data-parallel training: steps/s on 1 vs {args.nproc} processes\n\n- command: `{' '.join(sys.argv)}`\n"
          f"- device: {args.device}; {args.steps} steps per run, timed over rank 0's training loop; median of "
          f"{args.rounds} interleaved rounds\n\n{_table(rows, args.nproc)}\n")
    path.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
