"""SSL pretraining throughput: our on-device kornia views (fp32 and bf16) vs a torchvision-on-CPU loader.

The same backbone, SSL method, views, batch, optimiser and real Kermany images in every row; only where
and how the views are made, and the arithmetic, differ:

* ``torchvision loader``: the common recipe. A ``DataLoader`` worker runs per-image torchvision v2
  transforms (random resized crop, rotation, brightness/contrast, gamma, blur, solarize: the same
  distributions as ours) and hands float views to the training process, fp32 model.
* ``kornia views, fp32``: the loader hands uint8 batches; :class:`models.ssl.augment.MultiViewAugment`
  makes all views of the batch at once on the training device (what :func:`models.ssl.pretrain` does).
* ``kornia views, bf16``: the same with bf16 autocast (``PretrainConfig.precision="auto"`` on CUDA and on
  CPUs with native bf16; :func:`models.ssl.training.training_precision`).

Rows run interleaved in rounds in one process (a noisy shared machine hits every row alike); each
round times ``--steps`` optimiser steps after one warm-up step; the table reports the median round.
Throughput is given in images/s and in views/s (images x views per image: 2 global + N local for DINO).

    .venv/bin/python benchmarks/ssl_throughput.py --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import RESULTS_DIR, write_result
from models.data.folders import images_to_array, list_image_folder
from models.device import autocast_for
from models.ssl.augment import AugmentConfig, blur_params, normalize
from models.ssl.config import PretrainConfig
from models.ssl.training import build_ssl_model, training_precision

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "kermany-pneumonia"


class _RandomGamma:
    """Per-image gamma in a range with probability ``p`` (torchvision v2 has no random gamma transform)."""

    def __init__(self, gamma: tuple[float, float], p: float) -> None:
        self.gamma, self.p = gamma, p

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as F

        if torch.rand(()) >= self.p:
            return x
        g = float(torch.empty(()).uniform_(*self.gamma))
        return F.adjust_gamma(x, g)


def torchvision_view(cfg: AugmentConfig) -> Callable[[torch.Tensor], torch.Tensor]:
    """torchvision v2 per-image transforms drawing from the same distributions as our kornia view."""
    from torchvision.transforms import v2

    kernel, sigma = blur_params(cfg)
    b, c = cfg.brightness, cfg.contrast
    ops: list[Any] = [
        v2.RandomResizedCrop(cfg.size, scale=cfg.crop_scale, ratio=cfg.crop_ratio, antialias=True),
        v2.ToDtype(torch.float32, scale=True),
        v2.RandomApply([v2.RandomRotation(cfg.rotation_degrees)], p=cfg.rotation_p),
        v2.RandomApply([v2.ColorJitter(brightness=b, contrast=c)], p=cfg.intensity_p),
        _RandomGamma(cfg.gamma, cfg.gamma_p),
    ]
    if cfg.blur_p > 0:
        ops.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma)], p=cfg.blur_p))
    if cfg.solarize_p > 0:
        ops.append(v2.RandomSolarize(threshold=0.5, p=cfg.solarize_p))
    return v2.Compose(ops)


class TorchvisionViews(Dataset[list[torch.Tensor]]):
    """Each item: the DINO views of one uint8 image, made per image on the CPU by torchvision."""

    def __init__(self, images: np.ndarray, views: list[AugmentConfig]) -> None:
        self.images = torch.from_numpy(images).unsqueeze(1)
        self.transforms = [torchvision_view(v) for v in views]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> list[torch.Tensor]:
        return [t(self.images[i]) for t in self.transforms]


def _view_configs(cfg: PretrainConfig) -> list[AugmentConfig]:
    """The view configs of :func:`models.ssl.augment.dino_views` (2 global + n local) or
    :func:`models.ssl.augment.simclr_views` (2 alike) for ``cfg``."""
    if cfg.method == "simclr":
        return [AugmentConfig(size=cfg.resolution, crop_scale=cfg.global_crop_scale, blur_p=0.5)] * 2
    g1 = AugmentConfig(size=cfg.resolution, crop_scale=cfg.global_crop_scale, blur_p=1.0)
    g2 = AugmentConfig(size=cfg.resolution, crop_scale=cfg.global_crop_scale, blur_p=0.1, solarize_p=0.2)
    loc = AugmentConfig(size=cfg.local_size, crop_scale=cfg.local_crop_scale, blur_p=0.5)
    return [g1, g2] + [loc] * cfg.n_local_crops


class Row:
    """One benchmark row: a model + optimiser and a source of normalised view batches."""

    def __init__(self, name: str, cfg: PretrainConfig, batches: Iterator[list[torch.Tensor]],
                 precision: str) -> None:
        torch.manual_seed(cfg.seed)
        self.name, self.cfg, self.batches, self.precision = name, cfg, batches, precision
        self.model = build_ssl_model(cfg).train()
        self.optimizer = torch.optim.AdamW(self.model.trainable_modules().parameters(), lr=cfg.learning_rate)
        self.step_no = 0

    def step(self) -> None:
        """One optimiser step on the next batch of views (view making included in the time)."""
        crops = [normalize(v, self.cfg.norm_mean, self.cfg.norm_std) for v in next(self.batches)]
        with autocast_for(torch.device("cpu"), self.precision):  # type: ignore[arg-type]
            loss = self.model.training_loss(crops, self.step_no, 10_000)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.model.before_optimizer_step(self.step_no, 10_000)
        self.optimizer.step()
        self.model.after_optimizer_step(self.step_no, 10_000)
        self.step_no += 1


def _forever(loader: DataLoader[Any]) -> Iterator[Any]:
    while True:
        yield from loader


def _kornia_batches(images: np.ndarray, cfg: PretrainConfig, seed: int) -> Iterator[list[torch.Tensor]]:
    views = build_ssl_model(cfg).views()
    gen = np.random.default_rng(seed)
    data = torch.from_numpy(images).unsqueeze(1)
    while True:
        idx = torch.from_numpy(gen.choice(len(images), cfg.batch_size, replace=False))
        yield views(data[idx])


def build_rows(images: np.ndarray, cfg: PretrainConfig, workers: int) -> list[Row]:
    """The three rows of the table (see the module docstring)."""
    tv = DataLoader(TorchvisionViews(images, _view_configs(cfg)), batch_size=cfg.batch_size, shuffle=True,
                    num_workers=workers, persistent_workers=workers > 0, drop_last=True,
                    generator=torch.Generator().manual_seed(cfg.seed))
    bf16 = training_precision(cfg.replace(precision="auto"), torch.device("cpu"))
    return [
        Row(f"torchvision loader ({workers} worker{'s' if workers != 1 else ''}), fp32", cfg, _forever(tv), "fp32"),
        Row("kornia views on device, fp32", cfg, _kornia_batches(images, cfg, 1), "fp32"),
        Row(f"kornia views on device, {bf16} (auto)", cfg, _kornia_batches(images, cfg, 2), bf16),
    ]


def measure(rows: list[Row], steps: int, rounds: int) -> dict[str, list[float]]:
    """Seconds per step of each row, one value per round, rounds interleaved across rows."""
    per_step: dict[str, list[float]] = {r.name: [] for r in rows}
    for r in rows:
        r.step()  # warm-up: oneDNN primitive creation, loader start
    for _ in range(rounds):
        for r in rows:
            t0 = time.perf_counter()
            for _ in range(steps):
                r.step()
            per_step[r.name].append((time.perf_counter() - t0) / steps)
    return per_step


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Image folder (real Kermany by default).")
    ap.add_argument("--images", type=int, default=512, help="Images decoded into RAM for the rows.")
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=4, help="Steps per timed round.")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the training process.")
    ap.add_argument("--workers", type=int, default=1, help="DataLoader workers of the torchvision row.")
    ap.add_argument("--method", default="dino", choices=("dino", "simclr"))
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "ssl_throughput.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    paths = [r.path for r in list_image_folder(args.data)]
    pick = np.random.default_rng(0).choice(len(paths), min(args.images, len(paths)), replace=False)
    images = images_to_array([paths[i] for i in sorted(pick)], args.resolution, threads=args.threads)
    cfg = PretrainConfig(method=args.method, resolution=args.resolution, batch_size=args.batch_size, seed=0)
    n_views = 2 + cfg.n_local_crops if args.method == "dino" else 2
    rows = build_rows(images, cfg, args.workers)
    per_step = measure(rows, args.steps, args.rounds)
    base = statistics.median(per_step[rows[0].name])
    table = []
    for r in rows:
        s = statistics.median(per_step[r.name])
        table.append({"row": r.name, "s_per_step": round(s, 4), "images_per_s": round(args.batch_size / s, 2),
                      "views_per_s": round(args.batch_size * n_views / s, 1), "vs_torchvision": round(base / s, 2),
                      "rounds_s_per_step": [round(x, 4) for x in per_step[r.name]]})
    payload = {"method": args.method, "backbone": cfg.backbone, "resolution": args.resolution,
               "local_resolution": cfg.local_size if args.method == "dino" else None, "views_per_image": n_views,
               "batch_size": args.batch_size, "threads": args.threads, "torchvision_workers": args.workers,
               "images": len(images), "steps_per_round": args.steps, "rounds": args.rounds, "rows": table}
    path = write_result("ssl_throughput", payload, args.out)
    lines = [f"# SSL throughput: {args.method}, {cfg.backbone} at {args.resolution} px, batch {args.batch_size}", "",
             f"`{' '.join(['ssl_throughput.py', *(argv if argv is not None else sys.argv[1:])])}` "
             f"({args.threads} torch threads; median of {args.rounds} interleaved rounds of {args.steps} steps; "
             f"{n_views} views per image; real Kermany images)", "",
             "| row | s/step | images/s | views/s | vs torchvision |", "|---|---|---|---|---|"]
    lines += [f"| {t['row']} | {t['s_per_step']} | {t['images_per_s']} | {t['views_per_s']} | "
              f"{t['vs_torchvision']}x |" for t in table]
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
