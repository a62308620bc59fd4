"""The copy-detection encoder of the gate's embedding test (``models/weights/copy-detector-64``).

Why a dedicated network: the reference classifier's features are built to tell pneumonia from normal,
not one radiograph from another; measured on Kermany (``docs/results/privacy_gate.md``, baselines), as
the gate's embedding test it caught 0-5% of shifted, noised, contrast- or gamma-changed copies of
training images; this network catches 71-100% of them (the pixel test catches the rest).
Copy detection is instance discrimination with the perturbations a copy may carry as the "views": the
recipe of SSCD (Pizzi et al., CVPR 2022), here with the project's SimCLR library (:mod:`models.ssl`),
small crops (80-100% of the image: shifts and zooms of a few percent), rotations up to 10 degrees,
brightness / contrast / gamma and blur, on a thin ResNet-18 at 64 px.

Trained on the Kermany training images (the shipped generator's training set). Its job is to recognise
those very images under perturbation, so training on them is what it needs; the gate's thresholds are
calibrated in its space by leave-one-out over the same images (:mod:`models.privacy.index`).

Reproduce (CPU: 2,209 s with one thread on a shared 2-core machine)::

    python -m models.privacy.copy_detector --data ../shared/data/kermany-pneumonia \
        --out models/weights/copy-detector-64
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from models.callbacks import OnStep, no_progress
from models.ssl.config import PretrainConfig
from models.ssl.training import PretrainResult, pretrain

COPY_DETECTOR_CONFIG = PretrainConfig(
    method="simclr",
    backbone="resnet18",
    backbone_kwargs={"channels": (16, 32, 64, 128), "stem_width": 16},
    resolution=64,
    global_crop_scale=(0.8, 1.0),
    simclr_hidden_dim=512,
    simclr_output_dim=128,
    simclr_temperature=0.1,
    max_steps=800,
    batch_size=256,
    learning_rate=2e-3,
    warmup_steps=40,
    checkpoint_every=100,
    export_fp16=True,
    seed=0,
)

NOTES = """Copy detector for the memorisation gate (`models.privacy`): its pooled 128-d features place an
image next to shifted, re-windowed, slightly rotated or blurred copies of itself and away from other
patients' images. Use it through `models.privacy.embedding.load_embedder("copy-detector-64")`; it is not
a diagnostic model and not a general-purpose encoder. Trained on the Kermany training split only."""


def train_copy_detector(
    data: str | Path, out_dir: str | Path, *, checkpoint_dir: str | Path | None = None, resume: bool = False,
    device: str = "auto", config: PretrainConfig = COPY_DETECTOR_CONFIG, on_step: OnStep = no_progress,
) -> PretrainResult:
    """Train the copy detector on a folder of real training images and export it to ``out_dir``."""
    return pretrain(data, config, out_dir, checkpoint_dir=checkpoint_dir, resume=resume, on_step=on_step,
                    device=device, notes=NOTES)


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python -m models.privacy.copy_detector --data DIR --out DIR``."""
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--checkpoint-dir", default=None)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()

    def log(step: int, total: int, message: str) -> None:
        if step % 10 == 0:
            print(f"{step}/{total} {message} {time.time() - t0:.0f}s", flush=True)

    r = train_copy_detector(args.data, args.out, checkpoint_dir=args.checkpoint_dir, resume=args.resume,
                            device=args.device, on_step=log)
    print(f"done: {r.steps} steps, final loss {r.final_loss:.4f}, {r.wall_seconds:.0f} s -> {r.out_dir}")


if __name__ == "__main__":
    main()
