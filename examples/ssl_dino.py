"""DINO on chest X-rays: pretrain a small ResNet-18 on a PneumoniaMNIST slice, export it, load it
with plain timm, and linear-probe it against a random ("scratch") encoder.

Tiny settings so it runs in under a minute on two CPU cores; the numbers say nothing about the
method at this scale (see benchmarks/paper_table.py for the real experiment).

    python examples/ssl_dino.py          # data from $CXR_DATA_DIR or ../shared/data
"""

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from models.data.folders import load_pneumoniamnist, write_image_folder
from models.evaluation import ClassificationConfig, evaluate_classification
from models.ssl import PretrainConfig, load_encoder, pretrain

torch.set_num_threads(1)
data_dir = Path(os.environ.get("CXR_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")
npz = data_dir / "pneumoniamnist" / "pneumoniamnist_28.npz"
out = Path(tempfile.mkdtemp(prefix="cxrsynth-dino-"))

# A 512-image slice of the PneumoniaMNIST training split (labels are not used for pretraining).
images, labels = load_pneumoniamnist(npz, "train")
pick = np.random.default_rng(0).permutation(len(images))[:512]
images, labels = images[pick], labels[pick]

# DINO: 2 global crops (32 px) + 2 local crops (16 px), momentum teacher on a cosine schedule.
# ResNet-18 with thin stages; the paper's ViT-S/16 is backbone="vit_small_patch16_224".
config = PretrainConfig(
    method="dino",
    backbone="resnet18",
    backbone_kwargs={"channels": (16, 32, 64, 128), "stem_width": 16},
    resolution=32,
    local_resolution=16,
    n_local_crops=2,
    dino_hidden_dim=256,
    dino_bottleneck_dim=64,
    dino_output_dim=512,
    max_steps=30,
    batch_size=32,
    learning_rate=1e-3,
    warmup_steps=5,
)


def report_progress(step: int, total: int, message: str) -> None:
    if step % 10 == 0 or step == total:
        print(f"  step {step}/{total}: {message}")


print(f"pretraining DINO on {len(images)} images ...")
result = pretrain(images, config, out / "encoder", on_step=report_progress)
print(f"exported to {result.out_dir} ({result.wall_seconds:.0f} s)")

# The export is plain timm: model.safetensors + config.json (+ README.md with the snippet).
encoder = load_encoder(out / "encoder")
with torch.no_grad():
    features = encoder((torch.rand(4, 1, 32, 32) - 0.5) / 0.25)
print(f"features: {tuple(features.shape)}")

# Linear probe: train on the slice (a patient-level validation split is carved from it), test on
# 200 images of the PneumoniaMNIST validation split, written as ImageFolders.
val_images, val_labels = load_pneumoniamnist(npz, "val")
write_image_folder(images, labels, out / "train", ["normal", "pneumonia"])
write_image_folder(val_images[:200], val_labels[:200], out / "test", ["normal", "pneumonia"])
probe = ClassificationConfig(n_resamples=200, scratch_kwargs=config.backbone_kwargs, resolution=32)
for name, enc in [("dino", out / "encoder"), ("scratch", "scratch:resnet18")]:
    r = evaluate_classification(enc, out / "train", out / "test", mode="linear", config=probe,
                                json_path=out / f"linear-{name}.json")
    auc = r["metrics"]["auc"]
    print(f"{name:8s} linear-probe AUC {auc['value']:.3f} (95% CI {auc['low']:.3f}-{auc['high']:.3f})")
print(f"reports in {out}")
