"""Sampling in fp32 vs bf16 autocast on a CPU with native bf16 (``CXRSYNTH_GENERATION_CPU_BF16``).

The same generator, labels, seed, sampler and batch in both rows, interleaved in rounds in one process (a
noisy shared machine hits both alike). Reports images/s per round and the pixel difference of the bf16
images from the fp32 ones (the service default), so the speed-up is weighed against what changes.

    .venv/bin/python benchmarks/sampling_precision.py --generator models/weights/generator-kermany-224 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import RESULTS_DIR, write_result
from models.device import cpu_bf16_supported
from models.diffusion.pipeline import CXRDiffusionPipeline

DEFAULT_GENERATOR = Path(__file__).resolve().parents[1] / "models" / "weights" / "generator-kermany-224"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--generator", type=Path, default=DEFAULT_GENERATOR)
    ap.add_argument("--n", type=int, default=16, help="Images per round (half normal, half pneumonia).")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "sampling_precision.json")
    args = ap.parse_args(argv)
    if not cpu_bf16_supported():
        raise SystemExit("this CPU has no native bf16 (AVX512-BF16/AMX): nothing to compare")
    torch.set_num_threads(args.threads)
    pipes = {"fp32": CXRDiffusionPipeline.from_pretrained(args.generator, device="cpu"),
             "bf16": CXRDiffusionPipeline.from_pretrained(args.generator, device="cpu", precision="auto")}
    labels = ["normal"] * (args.n // 2) + ["pneumonia"] * (args.n - args.n // 2)
    rates: dict[str, list[float]] = {k: [] for k in pipes}
    images: dict[str, np.ndarray] = {}
    for _ in range(args.rounds):
        for name, pipe in pipes.items():
            t0 = time.perf_counter()
            out = pipe(labels=labels, seed=0, sampler="dpmsolver++", num_inference_steps=args.steps,
                       guidance_scale=args.guidance)
            rates[name].append(args.n / (time.perf_counter() - t0))
            images[name] = np.stack([np.asarray(im, dtype=np.int16) for im in out.images])
    diff = np.abs(images["bf16"] - images["fp32"])
    payload = {"generator": args.generator.name, "n": args.n, "rounds": args.rounds, "steps": args.steps,
               "guidance": args.guidance, "threads": args.threads,
               "img_per_s": {k: [round(r, 3) for r in v] for k, v in rates.items()},
               "median_img_per_s": {k: round(statistics.median(v), 3) for k, v in rates.items()},
               "speedup": round(statistics.median(rates["bf16"]) / statistics.median(rates["fp32"]), 3),
               "pixel_diff_grey_levels": {"mean": round(float(diff.mean()), 3), "max": int(diff.max()),
                                          "share_changed": round(float((diff > 0).mean()), 4)}}
    path = write_result("sampling_precision", payload, args.out)
    med = payload["median_img_per_s"]
    lines = [f"# Sampling precision on CPU: `{args.generator.name}`", "",
             f"`sampling_precision.py {' '.join(argv if argv is not None else sys.argv[1:])}` ({args.threads} "
             f"threads, {args.n} images per round, DPM-Solver++ {args.steps}, guidance {args.guidance:g}, "
             f"{args.rounds} interleaved rounds)", "",
             "| precision | img/s (median) | rounds |", "|---|---|---|",
             f"| fp32 (default) | {med['fp32']} | {payload['img_per_s']['fp32']} |",
             f"| bf16 autocast | {med['bf16']} | {payload['img_per_s']['bf16']} |", "",
             f"Speed-up {payload['speedup']}x. bf16 images differ from fp32 by {diff.mean():.2f} grey levels on "
             f"average (max {int(diff.max())}; {payload['pixel_diff_grey_levels']['share_changed']:.1%} of pixels)."]
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
