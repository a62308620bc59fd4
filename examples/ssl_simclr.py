"""SimCLR on chest X-rays: pretrain a small ResNet-18 on a PneumoniaMNIST slice, export it, load it
with plain timm, and fine-tune it for pneumonia vs normal (3 short epochs, to show the API).

Tiny settings so it runs in under a minute on two CPU cores; the numbers say nothing about the
method at this scale (see benchmarks/paper_table.py for the real experiment).

    python examples/ssl_simclr.py        # data from $CXR_DATA_DIR or ../shared/data
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
out = Path(tempfile.mkdtemp(prefix="cxrsynth-simclr-"))

# A 512-image slice of the PneumoniaMNIST training split (labels are not used for pretraining).
images, labels = load_pneumoniamnist(npz, "train")
pick = np.random.default_rng(0).permutation(len(images))[:512]
images, labels = images[pick], labels[pick]

# SimCLR: two augmented views per image, NT-Xent loss; the rest of the batch are the negatives.
config = PretrainConfig(
    method="simclr",
    backbone="resnet18",
    backbone_kwargs={"channels": (16, 32, 64, 128), "stem_width": 16},
    resolution=32,
    simclr_hidden_dim=256,
    simclr_output_dim=64,
    simclr_temperature=0.2,
    max_steps=30,
    batch_size=64,
    learning_rate=1e-3,
    warmup_steps=5,
)


def report_progress(step: int, total: int, message: str) -> None:
    if step % 10 == 0 or step == total:
        print(f"  step {step}/{total}: {message}")


print(f"pretraining SimCLR on {len(images)} images ...")
result = pretrain(images, config, out / "encoder", on_step=report_progress)
print(f"exported to {result.out_dir} ({result.wall_seconds:.0f} s)")

# The export is plain timm: model.safetensors + config.json (+ README.md with the snippet).
encoder = load_encoder(out / "encoder")
with torch.no_grad():
    features = encoder((torch.rand(4, 1, 32, 32) - 0.5) / 0.25)
print(f"features: {tuple(features.shape)}")

# Fine-tune with 25% of the training labels (seeded, stratified), model selection and threshold on a
# patient-level validation split of the training folder, test on 200 PneumoniaMNIST validation images.
val_images, val_labels = load_pneumoniamnist(npz, "val")
write_image_folder(images, labels, out / "train", ["normal", "pneumonia"])
write_image_folder(val_images[:200], val_labels[:200], out / "test", ["normal", "pneumonia"])
finetune = ClassificationConfig(epochs=3, batch_size=32, n_resamples=200)
r = evaluate_classification(out / "encoder", out / "train", out / "test", mode="finetune", label_fraction=0.25,
                            config=finetune, json_path=out / "finetune.json")
for name in ("auc", "f1", "sensitivity", "specificity"):
    m = r["metrics"][name]
    print(f"{name:12s} {m['value']:.3f} (95% CI {m['low']:.3f}-{m['high']:.3f})")
print(f"threshold {r['threshold']['value']:.3f} ({r['threshold']['rule']}, chosen on validation); report {out}")
