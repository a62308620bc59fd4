"""``python -m models.metrics.reference``: train and ship a reference classifier."""

from __future__ import annotations

import argparse
import os

import torch

from models.metrics.reference.classifier import SHIPPED_DIR
from models.metrics.reference.recipe import train_reference_classifier

DESCRIPTION = (
    "The reference pneumonia classifier: the feature space of domain FID / PRDC and the judge of label fidelity."
)


def main(argv: list[str] | None = None) -> None:
    """CLI: train and ship a reference classifier (see the package docstring)."""
    parser = argparse.ArgumentParser(prog="python -m models.metrics.reference", description=DESCRIPTION)
    parser.add_argument("--data", required=True, help="ImageFolder with normal/ and pneumonia/ (real images)")
    parser.add_argument("--out", default=str(SHIPPED_DIR))
    parser.add_argument("--model", default="resnet10t", help="timm model name")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("CXR_TORCH_THREADS", "2")))
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    train_reference_classifier(
        args.data,
        args.out,
        timm_name=args.model,
        resolution=args.resolution,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        device=args.device,
        log=lambda s: print(s, flush=True),
    )
