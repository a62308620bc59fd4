"""The paper table (issue 12, "Encoders that pay off"): does self-supervised pretraining on synthetic chest
X-rays pay off as well as pretraining on real ones, and does either beat raw pixels?

Arms (``ARM_SPECS``, the one list the CLI, the plan and the tables read; the same backbone, SSL method,
steps, batch and seed for every pretrained arm, so every pretrained arm has the same budget):

* ``scratch``        random initialisation (no pretraining);
* ``real``           SSL on the N real images of the training patients (``ssl_real_images``, None: all);
* ``synthetic``      SSL on N synthetic images (the same count as ``real``);
* ``synthetic-4x``   SSL on 4N synthetic images (``synthetic_multiplier``);
* ``real+synthetic`` SSL on the N real plus the N synthetic images;
* ``raw-pixels``     no encoder: L2 logistic regression on standardised 32x32 pixels with C chosen on the
                     validation split (classification, linear mode only), the floor a frozen encoder must beat.

Each arm is evaluated with the project's own evaluation code (``models.evaluation``), linear probe and
fine-tuning, at label fractions 1%, 10% and 100%, on pneumonia classification (AUC, F1, accuracy,
sensitivity, specificity) and lung segmentation (Dice, IoU, HD95), with bootstrap 95% CIs. Cells below 100%
labels run once per seed of ``seeds_small_fractions`` (0, 1, 2): the seed is the evaluation's seed, which
draws the label subsample, the head (decoder) initialisation and the batch order; ``models.evaluation`` uses
the same seed for its patient-level validation split, so that varies too. The encoder is the same for every
seed (``scratch`` is initialised from the seed). 100% runs seed 0. Tables show the mean over seeds with a
95% CI that adds the seeds' spread to the test-set bootstrap uncertainty (:func:`combine_seeds`).

Data. The official Kermany test split is withheld from this project, so a test split is carved here:
all Kermany patients are split once, patient-level, stratified by label and seeded
(``models.data.folders.patient_split``); classification tests on images of the test patients, lung
segmentation on the lung-seg pairs of the same test patients (lung-seg images are Kermany images), and
nothing of a test patient is ever used for SSL, fine-tuning or model selection. Profiles may subsample the
train and test sides (stratified, seeded) to fit their budget. Caveat, stated in every output: the
shipped generators were trained on all 5,016 Kermany training images, test patients included, so the
synthetic arms saw the test patients at one remove; the withheld official test split is the clean check.

Synthetic images come from one of two sources, recorded with the results:

* ``--synthetic PATH``: a privacy-gated WebDataset export (``cxrsynth datasets export ID --format
  webdataset --out syn.tar``, extracted: ``shards/``, ``manifest.csv``, ``card.json``), any folder of
  ``*.tar`` shards, or ``s3://bucket/prefix`` (keys from the AWS environment variables). The synthetic arms
  stream from it through ``models.ssl.pretrain``; the 1x arm reads its first N samples and the 4x arm its
  first 4N (:func:`synthetic_subset`). The export's card gives the generator and the privacy gate's verdict.
* otherwise images are sampled in process from ``--generator`` (default ``generator-kermany-224``, the best
  shipped one; resized to the profile resolution), once (guidance 2, DPM-Solver++ 20 steps, labels in the
  real class balance) and cached outside the repository under ``--cache-dir`` keyed by generator
  fingerprint, count, seed and sampler; the 1x set is the first images of each label of the 4x set.

Everything is resumable: SSL runs checkpoint, and every (backbone, arm, task, mode, fraction, seed) cell is
cached in ``cells.json`` of the run folder (named by the profile's fingerprint and the synthetic source), so
a killed run continues where it stopped.

Profiles: ``smoke`` (tiny, seconds, used by the tests), ``cpu-small`` (ResNet-18 at 64 px on subsets, about
an hour on 2 idle cores), ``cpu-12`` (issue 12's CPU run: SimCLR on ResNet-18 at 64 px, picked by
``benchmarks/ssl_recipe.py``, all the data, segmentation at 128 px, 4,700 x 32 = 150,400 image-views of SSL
per pretrained arm; many hours: see ``--plan-only``, and ``--merge`` to build it across machines) and
``gpu-full`` (ViT-S/16 and ResNet-50 at 224 px, all the data, synthetic arms from an export of at least
100,000 images).

    python benchmarks/paper_table.py --profile cpu-12 --plan-only      # sizes and ETA, runs nothing
    python benchmarks/paper_table.py --profile cpu-12 --probe          # time each component, write probe JSON
    python benchmarks/paper_table.py --profile cpu-12                  # the run (resumable)

An arm pretrained on another machine is evaluated from its exported encoder (``--encoder ARM=DIR``: checked
against the profile's recipe and, for a synthetic arm, the export it read) and joined to the committed table::

    python benchmarks/paper_table.py --profile cpu-12 --arms synthetic-4x --synthetic WDS \
        --encoder synthetic-4x=models/weights/encoder-synthetic-resnet18-64 --merge docs/results/paper_table-cpu-12.json

(an encoder this benchmark shipped names its arm in its config: only that arm takes it).

``gpu-full`` on one GPU, from a 100k-image synthetic dataset exported with
``cxrsynth datasets export ID --format webdataset --out syn100k.tar`` and extracted to ``/data/syn100k``:

    python benchmarks/paper_table.py --profile gpu-full --synthetic /data/syn100k --device cuda

Outputs: a markdown table with CIs, the JSON (command, commit, machine, synthetic source), label-efficiency
PNG plots, and (``cpu-small`` and ``cpu-12`` by default) the best arm that used no real image in pretraining
exported in fp16 to ``models/weights/encoder-synthetic-resnet18-64`` with its model card: the service serves
it as a built-in encoder.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import tarfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal, NamedTuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import REPO_ROOT, RESULTS_DIR, commit, machine, machine_line, write_result
from models.ssl.shards import LocalShards, ShardCount, ShardIndex, ShardSource

TASKS = ("classification", "segmentation")
MODES = ("linear", "finetune")
PRIMARY = {"classification": "auc", "segmentation": "dice"}
DEFAULT_GENERATOR = REPO_ROOT / "models" / "weights" / "generator-kermany-224"
REFERENCE_GENERATOR = REPO_ROOT / "models" / "weights" / "generator-kermany-64"  # the one sampling.json timed
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cxrsynth" / "paper_table"
SHIPPED_ENCODER = REPO_ROOT / "models" / "weights" / "encoder-synthetic-resnet18-64"
EXPORTING_PROFILES = ("cpu-small", "cpu-12")  # profiles that export the shipped encoder by default
RAW_PIXELS = 32  # side of the raw-pixel baseline's images
CAVEAT = ("The shipped generators were trained on all 5,016 Kermany training images, including the patients of "
          "the test split carved here, so the synthetic arms saw the test patients at one remove; the withheld "
          "official Kermany test split is the clean evaluation.")


# --------------------------------------------------------------------------------------------------
# Arms
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ArmSpec:
    """One arm: what its encoder is pretrained on (if anything) and which cells it has."""

    name: str
    description: str
    pretrained: bool = True
    real: bool = False  # the N real training-patient images are in its pretraining data
    synthetic: Literal["none", "1x", "multiplied"] = "none"  # N or synthetic_multiplier x N synthetic images
    tasks: tuple[str, ...] = TASKS
    modes: tuple[str, ...] = MODES

    def synthetic_count(self, n_real: int, multiplier: int) -> int:
        """How many synthetic images its pretraining reads, given the real arm's count N."""
        return {"none": 0, "1x": n_real, "multiplied": multiplier * n_real}[self.synthetic]


ARM_SPECS: tuple[ArmSpec, ...] = (
    ArmSpec("scratch", "random initialisation, no pretraining", pretrained=False),
    ArmSpec("real", "SSL on the N real images of the training patients", real=True),
    ArmSpec("synthetic", "SSL on N synthetic images", synthetic="1x"),
    ArmSpec("synthetic-4x", "SSL on synthetic_multiplier (4) x N synthetic images", synthetic="multiplied"),
    ArmSpec("real+synthetic", "SSL on the N real plus the N synthetic images", real=True, synthetic="1x"),
    ArmSpec("raw-pixels", f"L2 logistic regression on standardised {RAW_PIXELS}x{RAW_PIXELS} pixels",
            pretrained=False, tasks=("classification",), modes=("linear",)),
)
ARMS = tuple(a.name for a in ARM_SPECS)
NO_REAL_ARMS = tuple(a.name for a in ARM_SPECS if a.pretrained and not a.real)  # SSL saw no real image
SYNTHETIC_ARMS = tuple(a.name for a in ARM_SPECS if a.synthetic != "none")


def arm_spec(name: str) -> ArmSpec:
    """The registered arm ``name``; ``ValueError`` naming the known arms for any other name."""
    for spec in ARM_SPECS:
        if spec.name == name:
            return spec
    raise ValueError(f"unknown arm {name!r}; known arms: {', '.join(ARMS)}")


# --------------------------------------------------------------------------------------------------
# Profiles
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Profile:
    """Everything that decides the numbers of a run (its hash names the run folder)."""

    name: str
    backbones: tuple[str, ...]
    resolution: int
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    seg_resolution: int | None = None  # lung segmentation's input size (None: ``resolution``)
    # data: None = everything on that side of the patient-level test split
    test_patient_fraction: float = 0.2
    cls_train_images: int | None = None
    cls_test_images: int | None = None
    seg_train_pairs: int | None = None
    seg_test_pairs: int | None = None
    ssl_real_images: int | None = None
    synthetic_multiplier: int = 4  # the synthetic-4x arm reads this many times N synthetic images
    synthetic_min_images: int = 0  # >0: the synthetic arms need a --synthetic export at least this large
    # synthetic sampling (in process, without --synthetic)
    sampler: str = "dpmsolver++"
    sampling_steps: int = 20
    guidance: float = 2.0
    # SSL (identical for every pretrained arm)
    ssl_method: str = "dino"
    ssl_steps: int = 300
    ssl_batch: int = 64
    ssl_overrides: dict[str, Any] = field(default_factory=dict)
    # evaluation (identical for every arm)
    cls_config: dict[str, Any] = field(default_factory=dict)
    seg_config: dict[str, Any] = field(default_factory=dict)
    fractions: tuple[float, ...] = (0.01, 0.1, 1.0)
    seeds_small_fractions: tuple[int, ...] = (0, 1, 2)  # evaluation seeds of the cells below 100% labels
    seed: int = 0  # the test split, the subsets, sampling and SSL
    # seconds, used for the ETA until a probe of this profile exists (see --probe)
    assumed_rates: dict[str, float] = field(default_factory=dict)
    note: str = ""

    def __post_init__(self) -> None:
        if self.synthetic_multiplier < 1:
            raise ValueError("synthetic_multiplier must be at least 1")
        if not self.seeds_small_fractions or len(set(self.seeds_small_fractions)) != len(self.seeds_small_fractions):
            raise ValueError("seeds_small_fractions must be distinct and not empty")
        if self.seg_resolution is not None and self.seg_resolution < 16:
            raise ValueError("seg_resolution must be at least 16")

    def fingerprint(self) -> str:
        """Hash of the fields that change results; the selections (fractions, seeds) and notes are left out,
        so adding a fraction or a seed adds cells to the same run folder."""
        d = dataclasses.asdict(self)
        for k in ("fractions", "seeds_small_fractions", "synthetic_min_images", "assumed_rates", "note"):
            d.pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:10]

    def seeds(self, fraction: float) -> tuple[int, ...]:
        """The evaluation seeds of a label fraction: every seed below 100%, seed 0 at 100%."""
        return (0,) if fraction >= 1.0 else self.seeds_small_fractions

    @property
    def segmentation_resolution(self) -> int:
        """The input size of the segmentation cells."""
        return self.seg_resolution or self.resolution


THIN_RESNET = {"channels": (8, 16, 32, 64), "stem_width": 8}

PROFILES: dict[str, Profile] = {
    "smoke": Profile(
        name="smoke", backbones=("resnet18",), resolution=32, backbone_kwargs=THIN_RESNET,
        cls_train_images=40, cls_test_images=20, seg_train_pairs=24, seg_test_pairs=8, ssl_real_images=4,
        sampling_steps=3, ssl_steps=2, ssl_batch=8,
        ssl_overrides={"local_resolution": 16, "n_local_crops": 2, "dino_hidden_dim": 64, "dino_bottleneck_dim": 32,
                       "dino_output_dim": 128},
        cls_config={"epochs": 1, "batch_size": 16, "n_resamples": 100, "linear_c_grid": (0.1, 1.0)},
        seg_config={"epochs": 1, "batch_size": 8, "n_resamples": 100, "decoder_channels": (32, 16, 8, 8, 8)},
        fractions=(0.1, 1.0),
        assumed_rates={"sample_s_per_image": 0.4, "ssl_s_per_step": 0.5, "cell_overhead_s": 0.5,
                       "cls_train_img_s": 300.0, "seg_train_img_s": 150.0, "infer_img_s": 1000.0,
                       "decode_img_s": 500.0, "raw_fit_img_s": 2000.0},
        note="plumbing check: tiny sizes, 3 sampling steps; its numbers mean nothing",
    ),
    "cpu-small": Profile(
        name="cpu-small", backbones=("resnet18",), resolution=64,
        cls_train_images=1000, cls_test_images=600, seg_train_pairs=300, seg_test_pairs=150, ssl_real_images=256,
        ssl_steps=350, ssl_batch=32,
        ssl_overrides={"n_local_crops": 4, "dino_hidden_dim": 1024, "dino_bottleneck_dim": 128,
                       "dino_output_dim": 2048, "warmup_steps": 30, "checkpoint_every": 25},
        cls_config={"epochs": 6, "batch_size": 32},
        seg_config={"epochs": 8, "batch_size": 16, "decoder_channels": (128, 64, 32, 16, 8)},
        # the probe of this machine (docs/results/paper_table_probe-cpu-small.json, 64 px generator), rounded;
        # sampling: the 224 px generator (see cpu-12)
        assumed_rates={"sample_s_per_image": 1.6, "ssl_s_per_step": 0.93, "cls_cell_overhead_s": 0.3,
                       "seg_cell_overhead_s": 1.7, "cls_train_img_s": 117.0, "seg_train_img_s": 81.0,
                       "infer_img_s": 460.0, "decode_img_s": 1800.0, "raw_fit_img_s": 2000.0},
        note="ResNet-18 at 64 px on subsets, sized for about an hour on 2 idle CPU cores",
    ),
    "cpu-12": Profile(
        name="cpu-12", backbones=("resnet18",), resolution=64, seg_resolution=128,
        ssl_steps=4700, ssl_batch=32,  # 150,400 image-views per pretrained arm
        # SimCLR at 64 px: the best gain per CPU-hour of benchmarks/ssl_recipe.py (docs/results/ssl_recipe.md:
        # linear probe at 10% labels +0.485 AUC per CPU-hour over scratch, vs DINO at 64 px +0.096 and SimCLR at
        # 128 px +0.116, at 16k image-views each on the real training patients). The paper used DINO; gpu-full
        # keeps it.
        ssl_method="simclr",
        ssl_overrides={"warmup_steps": 470, "checkpoint_every": 100},
        cls_config={"epochs": 6, "batch_size": 32},
        seg_config={"epochs": 8, "batch_size": 16, "decoder_channels": (128, 64, 32, 16, 8)},
        # Assumed, never measured as a whole (run --probe). SSL: docs/results/ssl_throughput_simclr.json (SimCLR
        # at 64 px, batch 32, bf16, 2 threads, quiet: 0.24 s/step). Classification, inference and decoding: the
        # cpu-small probe (same backbone and resolution). Segmentation: the cpu-small probe's 64 px rates over 4
        # (4x the pixels at 128 px). Sampling: generator-kermany-224, 20 steps, guidance 2, fp32, 2 threads,
        # quiet (docs/results/sampling_precision.json: 3.09 img/s; bf16 3.94 img/s).
        assumed_rates={"sample_s_per_image": 0.32, "ssl_s_per_step": 0.24, "cls_cell_overhead_s": 0.3,
                       "seg_cell_overhead_s": 3.0, "cls_train_img_s": 117.0, "seg_train_img_s": 20.0,
                       "infer_img_s": 460.0, "decode_img_s": 1800.0, "raw_fit_img_s": 2000.0},
        note="issue 12's CPU run: SimCLR on ResNet-18 at 64 px (the measured best gain per CPU-hour), all the "
             "data, segmentation at 128 px, 150k image-views of SSL per pretrained arm, 3 seeds below 100% labels",
    ),
    "gpu-full": Profile(
        name="gpu-full", backbones=("vit_small_patch16_224", "resnet50"), resolution=224,
        synthetic_min_images=100_000,
        ssl_steps=3000, ssl_batch=256, ssl_overrides={"warmup_steps": 300, "checkpoint_every": 250},
        cls_config={"epochs": 20, "batch_size": 64}, seg_config={"epochs": 40, "batch_size": 32},
        # guesses for one H100/H200 (never measured): run --probe on the GPU first
        assumed_rates={"sample_s_per_image": 0.005, "ssl_s_per_step": 0.08, "cell_overhead_s": 10.0,
                       "cls_train_img_s": 1500.0, "seg_train_img_s": 600.0, "infer_img_s": 5000.0,
                       "decode_img_s": 2000.0, "raw_fit_img_s": 2000.0},
        note="the paper's backbones at 224 px on all the data (one GPU); synthetic arms from a --synthetic "
             "WebDataset export of at least 100,000 images",
    ),
}


# --------------------------------------------------------------------------------------------------
# Data: one patient-level split of Kermany, subsets, symlinked folders
# --------------------------------------------------------------------------------------------------
def _stratified_take(items: Sequence[Any], labels: Sequence[str], n: int | None, seed: int) -> list[Any]:
    """A seeded subset of ``n`` items keeping the label proportions (all items when ``n`` is None or larger)."""
    if n is None or n >= len(items):
        return list(items)
    rng = np.random.default_rng(seed)
    counts = Counter(labels)
    keep: list[int] = []
    for label in sorted(counts):
        members = [i for i, lab in enumerate(labels) if lab == label]
        k = max(1, round(n * counts[label] / len(items)))
        keep.extend(int(i) for i in rng.choice(members, size=min(k, len(members)), replace=False))
    return [items[i] for i in sorted(keep)]


def _link(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not dest.exists():
        dest.symlink_to(src.resolve())


def prepare_data(profile: Profile, data_dir: Path, run_dir: Path) -> dict[str, Any]:
    """Carve the test split, subsample, and write symlinked folders under ``run_dir/data`` (idempotent).

    Returns the split summary (sizes, label counts, patients) that goes into the results."""
    from models.data.folders import list_image_folder, patient_id_from_name, patient_split

    kermany, lungs = data_dir / "kermany-pneumonia", data_dir / "lung-seg"
    for folder in (kermany, lungs):
        if not folder.is_dir():
            raise SystemExit(f"{folder} not found: set CXR_DATA_DIR or --data-dir")
    records = list_image_folder(kermany)
    train_idx, test_idx = patient_split(records, val_fraction=profile.test_patient_fraction, seed=profile.seed)
    train_side = [records[i] for i in train_idx]
    test_side = [records[i] for i in test_idx]
    test_patients = {r.patient_id for r in test_side}
    out = run_dir / "data"
    done = out / "splits.json"
    if done.is_file():
        return dict(json.loads(done.read_text()))
    if out.exists():
        shutil.rmtree(out)

    seed = profile.seed
    cls_train = _stratified_take(train_side, [r.label or "" for r in train_side], profile.cls_train_images, seed)
    cls_test = _stratified_take(test_side, [r.label or "" for r in test_side], profile.cls_test_images, seed + 1)
    ssl_real = _stratified_take(train_side, [r.label or "" for r in train_side], profile.ssl_real_images, seed + 2)
    for name, recs in (("cls_train", cls_train), ("cls_test", cls_test), ("ssl_real", ssl_real)):
        for r in recs:
            _link(r.path, out / name / (r.label or "unlabelled") / r.path.name)

    with open(lungs / "labels.csv", newline="") as fh:
        seg_labels = {Path(row["filename"]).stem: row["label"].lower() for row in csv.DictReader(fh)}
    pairs = sorted(p for p in (lungs / "images").iterdir() if p.is_file())
    seg_test_side = [p for p in pairs if patient_id_from_name(p.name) in test_patients]
    seg_train_side = [p for p in pairs if patient_id_from_name(p.name) not in test_patients]
    seg_train = _stratified_take(seg_train_side, [seg_labels.get(p.stem, "") for p in seg_train_side],
                                 profile.seg_train_pairs, seed + 3)
    seg_test = _stratified_take(seg_test_side, [seg_labels.get(p.stem, "") for p in seg_test_side],
                                profile.seg_test_pairs, seed + 4)
    for name, chosen in (("seg_train", seg_train), ("seg_test", seg_test)):
        for p in chosen:
            _link(p, out / name / "images" / p.name)
            _link(lungs / "masks" / p.name, out / name / "masks" / p.name)
        with open(out / name / "labels.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["filename", "label"])
            w.writerows([p.name, seg_labels.get(p.stem, "")] for p in chosen)

    def counts(labels: Sequence[str]) -> dict[str, int]:
        return dict(sorted(Counter(labels).items()))

    summary: dict[str, Any] = {
        "test_split": {"method": "patient-level, label-stratified, seeded (StratifiedGroupKFold)",
                       "test_patient_fraction": profile.test_patient_fraction, "seed": seed,
                       "kermany_train_side": len(train_side), "kermany_test_side": len(test_side),
                       "test_patients": len(test_patients), "lung_seg_train_side": len(seg_train_side),
                       "lung_seg_test_side": len(seg_test_side),
                       # Which patients and lung images are held out, so --merge can refuse another split (the
                       # same seed gave another lung-seg test side with another scikit-learn).
                       "fingerprint": hashlib.sha256("\n".join([*sorted(test_patients), "--",
                                                                 *(p.name for p in seg_test_side)]).encode()
                                                     ).hexdigest()[:16]},
        "cls_train": {"images": len(cls_train), "counts": counts([r.label or "" for r in cls_train])},
        "cls_test": {"images": len(cls_test), "counts": counts([r.label or "" for r in cls_test])},
        "ssl_real": {"images": len(ssl_real), "counts": counts([r.label or "" for r in ssl_real])},
        "seg_train": {"pairs": len(seg_train), "counts": counts([seg_labels.get(p.stem, "") for p in seg_train])},
        "seg_test": {"pairs": len(seg_test), "counts": counts([seg_labels.get(p.stem, "") for p in seg_test])},
        "leak_checks": {
            "test_patients_in_cls_train": len({r.patient_id for r in cls_train} & test_patients),
            "test_patients_in_ssl_real": len({r.patient_id for r in ssl_real} & test_patients),
            "test_patients_in_seg_train": len({patient_id_from_name(p.name) for p in seg_train} & test_patients),
        },
    }
    if any(summary["leak_checks"].values()):
        raise RuntimeError(f"a test patient leaked into a training set: {summary['leak_checks']}")
    done.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


# --------------------------------------------------------------------------------------------------
# Synthetic images sampled in process: once, cached by generator fingerprint + count + seed + sampler
# --------------------------------------------------------------------------------------------------
def generator_fingerprint(generator: Path) -> str:
    """SHA-256 (16 hex) of the files that decide what a generator samples: its configs and weights, in the
    pixel layout or the latent one (``unet/``, ``vae/``, ``scheduler/``); the privacy indexes are left out."""
    files = sorted(p for p in generator.rglob("*") if p.is_file() and not p.name.startswith("privacy")
                   and (p.suffix == ".json" or p.name == "diffusion_pytorch_model.safetensors"))
    if not files:
        raise SystemExit(f"{generator} holds no generator (no config or weights): pass --generator")
    h = hashlib.sha256()
    for path in files:
        h.update(path.relative_to(generator).as_posix().encode() + b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def synthetic_cache_key(profile: Profile, generator: Path, total: int) -> str:
    """The cache folder name of ``total`` images sampled from ``generator`` with the profile's sampler."""
    return (f"{generator.name}-{generator_fingerprint(generator)}-n{total}-seed{profile.seed}-"
            f"{profile.sampler}{profile.sampling_steps}-g{profile.guidance:g}")


def synthetic_set(
    profile: Profile, generator: Path, counts: dict[str, int], cache_dir: Path, device: str,
    log: Callable[[str], None] = print, chunk: int = 64,
) -> tuple[np.ndarray, list[str], dict[str, Any]]:
    """``sum(counts)`` synthetic images ``(N, R, R)`` uint8 (the generator's resolution) with their labels,
    from cache or sampled now.

    Sampled in chunks of ``chunk`` images (each saved when done, so a killed run keeps what it made);
    image ``i`` comes from seed ``(profile.seed, i)`` whatever the chunking."""
    from models.diffusion import CXRDiffusionPipeline, plan_generation

    total = sum(counts.values())
    key = synthetic_cache_key(profile, generator, total)
    folder = cache_dir / "synthetic" / key
    final = folder / "images.npz"
    info = {"cache_key": key, "generator": generator.name, "images": total, "counts": counts,
            "sampler": profile.sampler, "steps": profile.sampling_steps, "guidance": profile.guidance,
            "seed": profile.seed}
    if final.is_file():
        with np.load(final) as z:
            return z["images"], [str(x) for x in z["labels"]], {**info, **json.loads(str(z["info"]))}
    folder.mkdir(parents=True, exist_ok=True)
    pipe = CXRDiffusionPipeline.from_pretrained(generator, device=device)
    labels = [str(x) for x in plan_generation(counts=counts, seed=profile.seed, label_names=pipe.label_names)]
    parts: list[np.ndarray] = []
    t0, sampled = time.perf_counter(), 0
    for start in range(0, total, chunk):
        stop = min(total, start + chunk)
        part = folder / f"chunk-{start:07d}-{stop:07d}.npy"
        if not part.is_file():
            out = pipe(labels=labels[start:stop], image_indices=list(range(start, stop)), seed=profile.seed,
                       sampler=profile.sampler, num_inference_steps=profile.sampling_steps,
                       guidance_scale=profile.guidance)
            tmp = part.with_suffix(".tmp.npy")
            np.save(tmp, np.asarray(out.images, dtype=np.uint8))
            tmp.replace(part)
            sampled += stop - start
            rate = (time.perf_counter() - t0) / sampled
            log(f"  sampled {stop}/{total} synthetic images ({rate:.2f} s/image)")
        parts.append(np.load(part))
    images = np.concatenate(parts)
    wall = time.perf_counter() - t0
    meta = {"sampling_seconds_this_run": round(wall, 1), "resolution": int(images.shape[-1])}
    tmp = folder / "images.tmp.npz"
    np.savez(tmp, images=images, labels=np.array(labels), info=json.dumps(meta))
    tmp.replace(final)
    for p in folder.glob("chunk-*.npy"):
        p.unlink()
    return images, labels, {**info, **meta}


def write_image_folder(images: np.ndarray, labels: Sequence[str], root: Path, prefix: str,
                       resolution: int | None = None) -> Path:
    """PNGs ``root/<label>/<prefix>-<i>.png``, resized to ``resolution`` (idempotent: a complete folder is
    left as is). Resizing here, as ``models.data.folders.resize_grey`` would at load, keeps the folder small."""
    from PIL import Image

    from models.data.folders import resize_grey

    marker = root / ".complete"
    if marker.is_file():
        return root
    for i, (img, lab) in enumerate(zip(images, labels, strict=True)):
        d = root / lab
        d.mkdir(parents=True, exist_ok=True)
        im = Image.fromarray(np.ascontiguousarray(img, dtype=np.uint8))
        if resolution is not None and im.size != (resolution, resolution):
            im = resize_grey(im, resolution)
        im.save(d / f"{prefix}-{i:06d}.png")
    marker.write_text("")
    return root


def _combine(folders: Sequence[Path], dest: Path) -> Path:
    """One ImageFolder of symlinks to the images of ``folders`` (names prefixed by their folder; idempotent)."""
    if not (dest / ".complete").is_file():
        for src in folders:
            for f in sorted(src.rglob("*")):
                if f.is_file() and not f.name.startswith("."):
                    _link(f, dest / f.parent.name / f"{src.name}-{f.name}")
        (dest / ".complete").write_text("")
    return dest


def _sampled_synthetic(profile: Profile, generator: Path, data: dict[str, Any], base: Path, cache_dir: Path,
                       device: str, log: Callable[[str], None]) -> tuple[Path, Path, dict[str, Any]]:
    """The 1x and multiplied synthetic folders sampled in process (the 1x set: the first images of each label
    of the multiplied set, exactly the real class counts) and their description."""
    real_counts = {k.lower(): int(v) for k, v in data["ssl_real"]["counts"].items()}
    mult = profile.synthetic_multiplier
    images, labels, info = synthetic_set(profile, generator, {k: v * mult for k, v in real_counts.items()},
                                         cache_dir, device, log)
    seen: Counter[str] = Counter()
    one_x = []
    for i, lab in enumerate(labels):
        if seen[lab] < real_counts.get(lab, 0):
            one_x.append(i)
            seen[lab] += 1
    syn1 = write_image_folder(images[one_x], [labels[i] for i in one_x], base / "ssl_synthetic", "syn",
                              profile.resolution)
    synm = write_image_folder(images, labels, base / f"ssl_synthetic_{mult}x", "syn", profile.resolution)
    info = {**info, "source": "sampled in process", "generator_path": _display(generator),
            "resized_to": profile.resolution}
    return syn1, synm, info


# --------------------------------------------------------------------------------------------------
# Synthetic images from a WebDataset export (--synthetic), streamed
# --------------------------------------------------------------------------------------------------
def export_identity(basis: str) -> str:
    """8 hex naming a synthetic source in a run folder's name (from its dataset version where known)."""
    return hashlib.sha256(str(basis).encode()).hexdigest()[:8]


@dataclass(frozen=True)
class SyntheticExport:
    """The WebDataset shards given with ``--synthetic``: where they are, what they hold, the export's card."""

    location: str  # the folder or s3:// URL as given
    index: ShardIndex
    card: dict[str, Any] | None

    def identity(self) -> str:
        """8 hex naming it in the run folder: from the card's dataset version (the SHA-256 of its manifest),
        else from the shard names and their sample counts."""
        version = ((self.card or {}).get("dataset") or {}).get("version")
        return export_identity(version or json.dumps([self.index.source.name, self.index.shards, self.index.counts]))

    def describe(self) -> dict[str, Any]:
        """What the results record about the source (the generator and gate verdict come from the card)."""
        card = self.card or {}
        ds, gen, privacy = card.get("dataset") or {}, card.get("generator") or {}, card.get("privacy") or {}
        where = self.location if self.location.startswith("s3://") else _display(Path(self.location))
        return {
            "source": "webdataset export", "location": where, "images_in_export": self.index.num_samples,
            "labels_in_export": self.index.labels, "shards": len(self.index.shards),
            "counted_from": self.index.counted_from, "card": "card.json" if self.card else None,
            "dataset": {k: ds.get(k) for k in ("id", "name", "version", "origin")} if ds else None,
            "generator": {k: gen.get(k) for k in ("id", "name", "resolution")} if gen else None,
            "generation": card.get("generation"),
            "privacy_gate": privacy.get("gate_status"), "privacy_summary": privacy.get("summary"),
        }


def open_synthetic(location: str) -> SyntheticExport:
    """Index the shards of ``--synthetic`` (a folder of ``*.tar``, an export folder with ``shards/``, or
    ``s3://bucket/prefix``) and read the export's ``card.json``; ``SystemExit`` naming the problem otherwise."""
    from models.ssl.data import shard_source
    from models.ssl.shards import index_shards

    source = shard_source(location if location.startswith("s3://") else Path(location))
    if source is None:
        hint = " (an export archive? extract it with tar -xf, then pass the folder)" if location.endswith(".tar") \
            and Path(location).is_file() else ""
        raise SystemExit(f"--synthetic {location}: not a folder of WebDataset shards (*.tar, or an export with "
                         f"shards/) nor an s3:// URL{hint}")
    try:
        return SyntheticExport(location, index_shards(source), _read_card(source))
    except (ValueError, OSError) as exc:
        raise SystemExit(f"--synthetic {location}: {exc}") from exc


def _read_card(source: ShardSource) -> dict[str, Any] | None:
    """The export's ``card.json`` beside its shards (folder or S3 prefix), or None when there is none."""
    from models.ssl.shards import S3Shards

    if isinstance(source, LocalShards):
        path = source.root / "card.json"
        return dict(json.loads(path.read_text())) if path.is_file() else None
    if isinstance(source, S3Shards):
        from minio.error import S3Error

        try:
            response = source.client().get_object(source.bucket, source.prefix + "card.json")
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject", "ResourceNotFound"):
                return None
            raise
        try:
            return dict(json.loads(response.read()))
        finally:
            response.close()
            response.release_conn()
    return None


TAIL_SHARD = "subset-tail.tar"


class SubsetShards(ShardSource):
    """The first samples of a shard source, as ``models.ssl.pretrain`` accepts it: the leading whole shards
    are read where they are (folder or S3, streamed), and the first samples of the next shard come from a
    local copy (``tail``), because a tar cannot be cut mid-stream."""

    def __init__(self, base: ShardSource, shards: Sequence[str], counts: Sequence[int], tail: Path | None,
                 n: int) -> None:
        self.base, self.shards, self.counts, self.tail = base, tuple(shards), tuple(counts), tail
        self.name = f"{base.name} (first {n:,} samples)"
        self.cheap_count = base.cheap_count

    def list_shards(self) -> list[str]:
        """The whole shards, then the tail copy."""
        return [*self.shards, *([TAIL_SHARD] if self.tail is not None else [])]

    def open(self, shard: str) -> AbstractContextManager[IO[bytes]]:
        """The base's shard, or the local tail copy."""
        if shard == TAIL_SHARD and self.tail is not None:
            return self.tail.open("rb")
        return self.base.open(shard)

    def open_manifest(self) -> AbstractContextManager[IO[bytes]] | None:
        """None: the counts come from :meth:`count`."""
        return None

    def where(self, shard: str) -> str:
        """The full location of a shard."""
        return str(self.tail) if shard == TAIL_SHARD else self.base.where(shard)

    def count(self, shard: str, read_labels: bool) -> ShardCount:
        """Walk a local shard; a remote whole shard's count is the one its export indexed (no second download:
        training checks it again as it reads)."""
        if shard == TAIL_SHARD and self.tail is not None:
            return LocalShards(self.tail.parent).count(self.tail.name, read_labels)
        if self.base.cheap_count:
            return self.base.count(shard, read_labels)
        return ShardCount(self.counts[self.shards.index(shard)])


def copy_first_samples(source: ShardSource, shard: str, k: int, dest: Path) -> None:
    """Write the first ``k`` samples of ``shard`` (all their members, bytes as stored) to the tar ``dest``."""
    from webdataset.tariterators import base_plus_ext

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".tmp")
    samples, current = 0, None
    with source.open(shard) as raw, tarfile.open(fileobj=raw, mode="r|") as tin, tarfile.open(tmp, "w") as tout:
        for member in tin:
            key = base_plus_ext(member.name)[0] if member.isreg() else None
            if key is None or ("/" not in member.name and member.name.startswith("__")):
                continue  # not part of a sample (as webdataset's tar iterator skips it)
            if key != current:
                if samples == k:
                    break
                samples, current = samples + 1, key
            tout.addfile(member, tin.extractfile(member))
    if samples < k:
        tmp.unlink()
        raise ValueError(f"{source.where(shard)} holds {samples} samples, {k} were needed")
    tmp.replace(dest)


def synthetic_subset(export: SyntheticExport, n: int, work_dir: Path) -> str | ShardSource:
    """The first ``n`` samples of ``export`` (in shard order) as ``models.ssl.pretrain`` takes them: the export's
    location when that is all of it, else a :class:`SubsetShards` (its tail copy under ``work_dir``)."""
    index = export.index
    if n > index.num_samples:
        raise SystemExit(f"--synthetic {export.location} holds {index.num_samples:,} images; {n:,} are needed")
    if n == index.num_samples:
        return export.location
    shards: list[str] = []
    taken = 0
    for shard, count in zip(index.shards, index.counts, strict=True):
        if taken + count > n:
            break
        shards.append(shard)
        taken += count
    tail = None
    if taken < n:
        shard = index.shards[len(shards)]
        tail = work_dir / f"first-{n}" / f"{Path(shard).stem}-first-{n - taken}.tar"
        if not tail.is_file():
            copy_first_samples(index.source, shard, n - taken, tail)
    return SubsetShards(index.source, shards, index.counts[:len(shards)], tail, n)


def write_shard_images(data: str | ShardSource, root: Path) -> Path:
    """Every image of shards as a file ``root/<label>/syn-<shard>-<key>.<ext>`` (the bytes as stored; the label
    from the sample's ``.json``, else ``.cls``; idempotent): the real+synthetic arm's synthetic half."""
    from models.ssl.data import shard_source
    from models.ssl.shards import index_shards, iter_samples, require_image

    marker = root / ".complete"
    if marker.is_file():
        return root
    source = shard_source(data)
    if source is None:
        raise ValueError(f"{data} is not WebDataset shards")
    index = index_shards(source)
    for shard, count in zip(index.shards, index.counts, strict=True):
        for sample in iter_samples(index.source, shard, count):
            key = str(sample["__key__"])
            ext = require_image(sample, key, index.source.where(shard))
            label = _sample_label(sample)
            (root / label).mkdir(parents=True, exist_ok=True)
            name = f"syn-{Path(shard).stem}-{key}".replace("/", "_")
            (root / label / f"{name}.{ext}").write_bytes(sample[ext])
    marker.write_text("")
    return root


def _sample_label(sample: dict[str, Any]) -> str:
    """A sample's label as a folder name: ``label`` of its ``.json``, else its ``.cls``, else ``unlabelled``."""
    label = ""
    if "json" in sample:
        obj = json.loads(sample["json"] or b"{}")
        label = str(obj.get("label") or "") if isinstance(obj, dict) else ""
    if not label and "cls" in sample:
        label = sample["cls"].decode().strip()
    label = "".join(c for c in label.lower() if c.isalnum() or c in "-_")
    return label or "unlabelled"


def _export_synthetic(profile: Profile, export: SyntheticExport, n_real: int, arms: Sequence[str], base: Path,
                      log: Callable[[str], None]) -> tuple[dict[str, str | ShardSource], Path | None, dict[str, Any]]:
    """The synthetic arms' data from the export: ``{"1x": ..., "multiplied": ...}`` (only those the arms use),
    the 1x images as a folder when ``real+synthetic`` needs them, and the source's description."""
    scales = {arm_spec(a).synthetic for a in arms} - {"none"}
    counts = {"1x": n_real, "multiplied": profile.synthetic_multiplier * n_real}
    data: dict[str, str | ShardSource] = {
        s: synthetic_subset(export, counts[s], base / "synthetic_subsets") for s in sorted(scales)}
    folder = None
    if any(arm_spec(a).real and arm_spec(a).synthetic != "none" for a in arms):
        folder = write_shard_images(data["1x"], base / "ssl_synthetic_export_1x")
    firsts = ", ".join(f"{counts[s]:,}" for s in sorted(scales))
    log(f"  synthetic: WebDataset {export.location} ({export.index.num_samples:,} images, "
        f"{len(export.index.shards)} shards); the arms read its first {firsts}")
    return data, folder, export.describe()


def ssl_data(profile: Profile, run_dir: Path, data: dict[str, Any], arms: Sequence[str],
             synthetic: SyntheticExport | None, generator: Path, cache_dir: Path, device: str,
             log: Callable[[str], None]) -> tuple[dict[str, Any], dict[str, Any]]:
    """What each selected pretrained arm pretrains on (a folder, a shard folder or URL, or a shard subset),
    and the description of the synthetic source that goes into the results."""
    base = run_dir / "data"
    n_real = int(data["ssl_real"]["images"])
    mult = profile.synthetic_multiplier
    table: dict[str, Any] = {"real": base / "ssl_real"}
    info: dict[str, Any] = {"source": "none (no synthetic arm selected)"}
    if any(a in SYNTHETIC_ARMS for a in arms):
        if synthetic is None:
            syn1, synm, info = _sampled_synthetic(profile, generator, data, base, cache_dir, device, log)
            by_scale: dict[str, Any] = {"1x": syn1, "multiplied": synm}
            one_x_folder: Path | None = syn1
        else:
            by_scale, one_x_folder, info = _export_synthetic(profile, synthetic, n_real, arms, base, log)
        for spec in ARM_SPECS:
            if spec.name in arms and spec.synthetic != "none" and not spec.real:
                table[spec.name] = by_scale[spec.synthetic]
        if "real+synthetic" in arms:
            assert one_x_folder is not None
            table["real+synthetic"] = _combine([base / "ssl_real", one_x_folder], base / "ssl_real_synthetic")
        info = {**info, "one_x": n_real, "multiplied": mult * n_real, "multiplier": mult}
    return {a: table[a] for a in arms if arm_spec(a).pretrained}, info


# --------------------------------------------------------------------------------------------------
# Encoders given with --encoder (an arm's SSL done elsewhere, e.g. the shipped encoder)
# --------------------------------------------------------------------------------------------------
# Settings of PretrainConfig that change how a run executes, not what it learns
RUNTIME_FIELDS = frozenset({"precision", "cache_limit_mb", "num_workers", "export_fp16", "checkpoint_every"})


@dataclass(frozen=True)
class GivenEncoder:
    """An arm's encoder taken from an exported folder (``--encoder ARM=DIR``) instead of pretrained in this run.

    Why: run folders are not kept between machines, but exported encoders are (the shipped one is committed);
    an arm whose SSL took hours is evaluated again from its export instead of pretrained again. Its weights may
    be fp16 (the shipped format); they are upcast when loaded, and the results record where they came from."""

    arm: str
    path: Path
    config: dict[str, Any]

    @property
    def synthetic(self) -> dict[str, Any] | None:
        """The synthetic source its export recorded (``metrics.synthetic``), if any."""
        return (self.config.get("metrics") or {}).get("synthetic")

    def source_tag(self) -> str | None:
        """``wds<identity>`` of the WebDataset export it was pretrained on (None: no export recorded)."""
        version = ((self.synthetic or {}).get("dataset") or {}).get("version")
        return f"wds{export_identity(version)}" if version else None


def given_encoders(specs: Sequence[str], profile: Profile, arms: Sequence[str]) -> dict[str, GivenEncoder]:
    """Parse and check ``--encoder ARM=DIR``: a selected pretrained arm, once; an exported cxrsynth encoder of this
    profile's backbone and SSL recipe; for a synthetic arm, one that records its WebDataset export.
    ``SystemExit`` naming the problem otherwise (its cells would not be this arm's)."""
    from models.ssl import read_encoder_config

    given: dict[str, GivenEncoder] = {}
    for spec in specs:
        arm, sep, folder = spec.partition("=")
        if not sep or not folder:
            raise SystemExit(f"--encoder {spec!r}: expected ARM=DIR")
        if arm not in ARMS or not arm_spec(arm).pretrained:
            raise SystemExit(f"--encoder {spec!r}: {arm!r} is not a pretrained arm "
                             f"({', '.join(a.name for a in ARM_SPECS if a.pretrained)})")
        if arm not in arms:
            raise SystemExit(f"--encoder {spec!r}: arm {arm!r} is not selected (--arms)")
        if arm in given:
            raise SystemExit(f"--encoder: arm {arm!r} given twice")
        if len(profile.backbones) != 1:
            raise SystemExit(f"--encoder needs a profile with one backbone ({profile.name} has "
                             f"{', '.join(profile.backbones)})")
        try:
            cfg = read_encoder_config(folder)
        except (OSError, ValueError, KeyError) as exc:
            raise SystemExit(f"--encoder {spec!r}: not an exported cxrsynth encoder ({exc})") from exc
        _check_recipe(spec, cfg, profile)
        recorded = (cfg.get("metrics") or {}).get("arm")  # an encoder shipped by this benchmark names its arm
        if recorded and recorded != arm:
            raise SystemExit(f"--encoder {spec!r}: that encoder is arm {recorded!r}, not {arm!r}")
        enc = GivenEncoder(arm, Path(folder), cfg)
        if arm in SYNTHETIC_ARMS and enc.source_tag() is None:
            raise SystemExit(f"--encoder {spec!r}: its config records no WebDataset export (metrics.synthetic."
                             "dataset.version), so its cells cannot be matched to a synthetic source")
        given[arm] = enc
    return given


def _check_recipe(spec: str, cfg: dict[str, Any], profile: Profile) -> None:
    """``SystemExit`` unless ``cfg`` was pretrained with this profile's recipe (runtime settings aside)."""
    want = dataclasses.asdict(pretrain_config(profile, profile.backbones[0]))
    have = (cfg.get("pretraining") or {}).get("config") or {}
    differ = [k for k in sorted(want) if k not in RUNTIME_FIELDS
              and json.dumps(want[k], default=list) != json.dumps(have.get(k), default=list)]
    problems = [f"architecture {cfg.get('architecture')!r}"] if cfg.get("architecture") != profile.backbones[0] else []
    problems += [f"{k} {have.get(k)!r} != {want[k]!r}" for k in differ]
    if problems:
        raise SystemExit(f"--encoder {spec!r}: pretrained with another recipe than profile {profile.name}'s "
                         f"({', '.join(problems)})")


def install_given_encoder(enc: GivenEncoder, run_dir: Path, backbone: str) -> None:
    """Copy ``enc`` into the arm's encoder folder of the run (atomically); a folder already there must hold the
    same weights (``SystemExit`` otherwise: the run's cells were computed from another encoder)."""
    from models.ssl.export import WEIGHTS

    dest = encoder_dir(run_dir, backbone, enc.arm)
    if (dest / "config.json").is_file():
        if _sha256(dest / WEIGHTS) != _sha256(enc.path / WEIGHTS):
            raise SystemExit(f"--encoder {enc.arm}={enc.path}: the run folder {run_dir} already holds another "
                             f"encoder for arm {enc.arm!r} (its cells came from it); use another --cache-dir")
        return
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(enc.path, tmp)
    cfg = json.loads((tmp / "config.json").read_text())
    cfg.setdefault("pretraining", {})["encoder_from"] = _display(enc.path)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(dest)


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# --------------------------------------------------------------------------------------------------
# Pretraining and cells
# --------------------------------------------------------------------------------------------------
def pretrain_config(profile: Profile, backbone: str) -> Any:
    """The :class:`models.ssl.PretrainConfig` of every pretrained arm of ``backbone`` (``precision`` is left at
    its default, ``auto``: bf16 on CUDA and on CPUs with native bf16)."""
    from models.ssl import PretrainConfig

    overrides = dict(profile.ssl_overrides)
    overrides.setdefault("warmup_steps", min(PretrainConfig.warmup_steps, profile.ssl_steps // 10))
    overrides.setdefault("checkpoint_every", max(1, min(PretrainConfig.checkpoint_every, profile.ssl_steps)))
    return PretrainConfig(method=profile.ssl_method, backbone=backbone,  # type: ignore[arg-type]
                          backbone_kwargs=dict(profile.backbone_kwargs), resolution=profile.resolution,
                          max_steps=profile.ssl_steps, batch_size=profile.ssl_batch, seed=profile.seed, **overrides)


def encoder_dir(run_dir: Path, backbone: str, arm: str) -> Path:
    """Where an arm's pretrained encoder is exported in the run folder."""
    return run_dir / "encoders" / backbone / arm.replace("+", "_")


def pretrain_arm(profile: Profile, backbone: str, arm: str, data: Any, run_dir: Path, device: str,
                 log: Callable[[str], None]) -> tuple[Path, dict[str, Any]]:
    """The arm's encoder folder (pretrained now, resumed from its checkpoint, or already there).

    ``data`` is anything ``models.ssl.pretrain`` takes: an image folder, a folder of WebDataset shards or an
    ``s3://`` URL (streamed), or a :class:`SubsetShards`."""
    from models.ssl import pretrain, read_encoder_config

    if not arm_spec(arm).pretrained:
        raise ValueError(f"arm {arm!r} has no pretraining")
    out = encoder_dir(run_dir, backbone, arm)
    if (out / "config.json").is_file():
        pre = read_encoder_config(out)["pretraining"]
        record = {"steps": pre["steps"], "wall_seconds": pre["wall_seconds"], "images": pre["data"]["num_images"],
                  "data": pre["data"].get("source"), "final_loss": pre.get("final_loss")}
        return out, {**record, **({"encoder_from": pre["encoder_from"]} if pre.get("encoder_from") else {})}
    ckpt = run_dir / "checkpoints" / backbone / arm.replace("+", "_")
    resume = (ckpt / "checkpoint.pt").is_file()
    last = [0.0]

    def on_step(step: int, total: int, message: str) -> None:
        now = time.perf_counter()
        if now - last[0] > 30 or step == total:
            last[0] = now
            log(f"  [{arm}] step {step}/{total}: {message}")

    log(f"pretraining {arm} ({profile.ssl_method}, {backbone}, {profile.ssl_steps} steps x {profile.ssl_batch})"
        + (" - resuming" if resume else ""))
    result = pretrain(data, pretrain_config(profile, backbone), out, checkpoint_dir=ckpt, resume=resume,
                      on_step=on_step, device=device,
                      notes=f"Arm `{arm}` of benchmarks/paper_table.py (profile {profile.name}).")
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["pretraining"]["final_loss"] = result.final_loss
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    shutil.rmtree(ckpt, ignore_errors=True)
    return out, {"steps": result.steps, "wall_seconds": round(result.wall_seconds, 1),
                 "images": result.data.num_images, "data": result.data.source, "final_loss": result.final_loss}


def group_key(backbone: str, arm: str, task: str, mode: str, fraction: float) -> str:
    """The key of a (backbone, arm, task, mode, fraction) group: its cells differ by seed only."""
    return f"{backbone}|{arm}|{task}|{mode}|{fraction:g}"


def cell_key(backbone: str, arm: str, task: str, mode: str, fraction: float, seed: int = 0) -> str:
    """The key of one cell in ``cells.json``."""
    return f"{group_key(backbone, arm, task, mode, fraction)}|{seed}"


class Cell(NamedTuple):
    """One evaluation: an arm's encoder of one backbone on one task, mode, label fraction and seed."""

    backbone: str
    arm: str
    task: str
    mode: str
    fraction: float
    seed: int = 0

    @property
    def key(self) -> str:
        """Its key in ``cells.json``."""
        return cell_key(*self)


def plan_cells(profile: Profile, arms: Sequence[str], tasks: Sequence[str], modes: Sequence[str],
               fractions: Sequence[float]) -> list[Cell]:
    """Every cell of a selection: each arm's own tasks and modes, each fraction's seeds (``Profile.seeds``)."""
    specs = [arm_spec(a) for a in arms]
    return [Cell(b, s.name, t, m, f, seed) for b in profile.backbones for s in specs for t in tasks if t in s.tasks
            for m in modes if m in s.modes for f in fractions for seed in profile.seeds(f)]


def run_cell(profile: Profile, cell: Cell, encoder: str | Path | None, run_dir: Path, device: str,
             report_dir: Path | None = None) -> dict[str, Any]:
    """One evaluation with the profile's config and the cell's seed; returns the cell summary (the full
    report is kept too, in ``report_dir``, default ``run_dir/reports``)."""
    from models.evaluation import (
        ClassificationConfig,
        SegmentationConfig,
        evaluate_classification,
        evaluate_segmentation,
    )

    report_path = (report_dir or run_dir / "reports") / f"{cell.key.replace('|', '__')}.json"
    if cell.arm == "raw-pixels":
        return raw_pixel_cell(profile, cell, run_dir, report_path)
    if encoder is None:
        raise ValueError(f"arm {cell.arm!r} needs an encoder")
    data = run_dir / "data"
    common: dict[str, Any] = {"seed": cell.seed, "scratch_model": cell.backbone,
                              "scratch_kwargs": dict(profile.backbone_kwargs)}
    if cell.task == "classification":
        cfg = ClassificationConfig(resolution=profile.resolution, **common, **profile.cls_config)
        report = evaluate_classification(encoder, data / "cls_train", data / "cls_test", mode=cell.mode,  # type: ignore[arg-type]
                                         label_fraction=cell.fraction, config=cfg, json_path=report_path,
                                         device=device)
    else:
        scfg = SegmentationConfig(resolution=profile.segmentation_resolution, **common, **profile.seg_config)
        report = evaluate_segmentation(encoder, data / "seg_train", data / "seg_test", mode=cell.mode,  # type: ignore[arg-type]
                                       label_fraction=cell.fraction, config=scfg, json_path=report_path,
                                       device=device)
    return {
        **_cell_fields(cell),
        "metrics": {k: {"value": v["value"], "low": v["low"], "high": v["high"]} for k, v in report["metrics"].items()},
        "train_images": report["split"]["train"], "val_images": report["split"]["val"],
        "test_images": report["split"]["test"], "selected": report["model_selection"]["chosen"],
        "wall_seconds": report["wall_seconds"], "report": report_path.name,
    }


def _cell_fields(cell: Cell) -> dict[str, Any]:
    return {"backbone": cell.backbone, "arm": cell.arm, "task": cell.task, "mode": cell.mode,
            "label_fraction": cell.fraction, "seed": cell.seed}


# --------------------------------------------------------------------------------------------------
# The raw-pixel baseline
# --------------------------------------------------------------------------------------------------
def pixel_features(images: np.ndarray) -> np.ndarray:
    """``(N, R, R)`` uint8 images as ``(N, R*R)`` floats in [0, 1]."""
    return images.reshape(len(images), -1).astype(np.float64) / 255.0


def fit_pixel_probe(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                    c_grid: Iterable[float], side: int = RAW_PIXELS) -> tuple[Any, dict[str, Any]]:
    """Standardised features and an L2, class-balanced logistic regression (scikit-learn) for each C of
    ``c_grid``; keeps the C with the best validation AUC (ties: the smaller C, stronger regularisation).

    The frozen-feature probe of ``models.evaluation`` fits the same head the same way, on encoder features;
    here it is fitted on pixels. Returns the fitted pipeline and the selection record."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from models.evaluation import auc_rows

    best: tuple[float, float, Any] | None = None
    candidates = []
    for c in sorted(float(c) for c in c_grid):
        model = make_pipeline(StandardScaler(), LogisticRegression(C=c, class_weight="balanced", max_iter=2000))
        model.fit(x_train, y_train)
        auc = float(auc_rows(model.predict_proba(x_val)[:, 1], y_val)[0])
        candidates.append({"C": c, "validation_auc": auc})
        if best is None or auc > best[0]:
            best = (auc, c, model)
    if best is None:
        raise ValueError("c_grid is empty")
    return best[2], {"chosen": {"C": best[1]}, "validation_auc": best[0], "candidates": candidates,
                     "head": f"logistic regression (L2, class-balanced) on standardised {side}x{side} pixels"}


class PixelFit(NamedTuple):
    """The raw-pixel probe fitted on one evaluation's carve: its selection, validation and test scores."""

    selection: dict[str, Any]
    p_val: np.ndarray
    y_val: np.ndarray
    p_test: np.ndarray
    y_test: np.ndarray
    test_files: list[str]
    train_images: int


def fit_pixels_on_carve(train: Path, test: Path, fraction: float, seed: int, cfg: Any,
                        side: int = RAW_PIXELS) -> PixelFit:
    """The frozen-feature probes' training subset and validation split (the same
    ``models.evaluation.validation_split`` call and seed) of ImageFolder ``train``, pixels at ``side`` x
    ``side``, ``C`` chosen on validation AUC; ``test`` scored once."""
    from models.data.folders import images_to_array, list_image_folder
    from models.evaluation import binary_labels, validation_split

    train_records, test_records = list_image_folder(train), list_image_folder(test)
    y_pool, names = binary_labels(train_records, cfg.positive_label, f"training folder {train}")
    y_test, _ = binary_labels(test_records, names[1], f"test folder {test}")
    split = validation_split(train_records, val_fraction=cfg.val_fraction, label_fraction=fraction, seed=seed)
    row = {r.path: i for i, r in enumerate(train_records)}
    y_train, y_val = (y_pool[[row[r.path] for r in part]] for part in (split.train, split.val))
    x_train, x_val, x_test = (pixel_features(images_to_array([r.path for r in rs], side, "pad", threads=2))
                              for rs in (split.train, split.val, test_records))
    model, selection = fit_pixel_probe(x_train, y_train, x_val, y_val, cfg.linear_c_grid, side)
    p_val, p_test = (model.predict_proba(x)[:, 1] for x in (x_val, x_test))
    return PixelFit(selection, p_val, y_val, p_test, y_test, [r.path.name for r in test_records], len(split.train))


def raw_pixel_cell(profile: Profile, cell: Cell, run_dir: Path, report_path: Path) -> dict[str, Any]:
    """The raw-pixel baseline's cell (:func:`fit_pixels_on_carve` at 32x32): the threshold rule and test
    metrics of the frozen-feature probes."""
    from models.evaluation import ClassificationConfig, choose_threshold, classification_metrics_with_ci

    t0 = time.perf_counter()
    cfg = ClassificationConfig(seed=cell.seed, **profile.cls_config)
    data = run_dir / "data"
    fit = fit_pixels_on_carve(data / "cls_train", data / "cls_test", cell.fraction, cell.seed, cfg)
    selection = fit.selection
    threshold = choose_threshold(fit.p_val, fit.y_val, cfg.threshold_rule)
    metrics = classification_metrics_with_ci(fit.p_test, fit.y_test, threshold, n_resamples=cfg.n_resamples,
                                             confidence=cfg.confidence, seed=cell.seed)
    summary = {
        **_cell_fields(cell),
        "metrics": {k: {"value": v.value, "low": v.low, "high": v.high} for k, v in metrics.items()},
        "train_images": fit.train_images, "val_images": len(fit.y_val), "test_images": len(fit.y_test),
        "selected": selection["chosen"], "wall_seconds": round(time.perf_counter() - t0, 2),
        "report": report_path.name,
    }
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps({**summary, "model_selection": {"criterion": "validation AUC", **selection},
                                       "threshold": {"rule": cfg.threshold_rule, "value": threshold}},
                                      indent=2) + "\n")
    return summary


class CellStore:
    """``cells.json`` of a run folder: one entry per finished cell, written atomically after each.

    Entries written before cells had seeds (keys of five fields) are read as seed 0."""

    def __init__(self, path: Path) -> None:
        self.path = path
        raw: dict[str, dict[str, Any]] = json.loads(path.read_text()) if path.is_file() else {}
        self.cells = dict(_with_seed(k, v) for k, v in raw.items())

    def __contains__(self, key: str) -> bool:
        return key in self.cells

    def put(self, key: str, value: dict[str, Any]) -> None:
        """Store one cell and rewrite the file."""
        self.cells[key] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.cells, indent=1, allow_nan=True) + "\n")
        tmp.replace(self.path)


def _with_seed(key: str, value: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    if key.count("|") == 4:  # backbone|arm|task|mode|fraction: from before seeds
        return f"{key}|0", {**value, "seed": 0}
    return key, value


# --------------------------------------------------------------------------------------------------
# Seeds: one estimate per group of cells
# --------------------------------------------------------------------------------------------------
Z95 = 1.959963984540054  # the 97.5% normal quantile: a 95% interval is +-Z95 standard errors
UNIT_METRICS = frozenset({"auc", "f1", "accuracy", "sensitivity", "specificity", "dice", "iou"})  # in [0, 1]
SEED_CI_WORDS = ("mean over the seeds; 95% CI = mean ± 1.96 √(mean of the seeds' bootstrap variances + "
                 "variance of the seeds / k), each seed's bootstrap SE = its 95% CI width / 3.92")


def combine_seeds(estimates: Sequence[dict[str, float]], bounds: tuple[float, float] = (0.0, 1.0)) -> dict[str, Any]:
    """One estimate from a metric measured at k evaluation seeds, each with a 95% bootstrap CI on the same test set.

    Point: the mean of the seeds' values. Interval: the mean ± 1.96 √(mean_i se_i² + s²/k), with se_i the
    seed's bootstrap standard error (its CI width / 3.92, a normal approximation of the percentile CI) and s
    the standard deviation of the k values. The test-set part is not divided by k: every seed scores the same
    test images, so that error does not average out (the mean of the variances bounds it from above); the
    seed part is the standard error of a mean of k seeds. Clipped to ``bounds``; one seed keeps its own CI;
    NaN values (metric undefined) are left out."""
    ok = [e for e in estimates if e["value"] == e["value"]]
    if not ok:
        return {"value": float("nan"), "low": float("nan"), "high": float("nan"), "n_seeds": 0, "seed_sd": 0.0}
    if len(ok) == 1:
        return {"value": ok[0]["value"], "low": ok[0]["low"], "high": ok[0]["high"], "n_seeds": 1, "seed_sd": 0.0}
    values = np.array([e["value"] for e in ok], dtype=np.float64)
    se = np.array([(e["high"] - e["low"]) / (2 * Z95) for e in ok], dtype=np.float64)
    mean, sd = float(values.mean()), float(values.std(ddof=1))
    half = Z95 * math.sqrt(float(np.mean(se**2)) + sd**2 / len(ok))
    return {"value": mean, "low": max(bounds[0], mean - half), "high": min(bounds[1], mean + half),
            "n_seeds": len(ok), "seed_sd": sd}


def aggregate_cells(cells: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The cells grouped by (backbone, arm, task, mode, fraction), every metric combined over the seeds
    (:func:`combine_seeds`); keyed by :func:`group_key`."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for c in cells.values():
        groups.setdefault(group_key(c["backbone"], c["arm"], c["task"], c["mode"], c["label_fraction"]), []).append(c)
    out = {}
    for key, members in groups.items():
        members = sorted(members, key=lambda c: int(c.get("seed", 0)))
        first = members[0]
        metrics = {name: combine_seeds([c["metrics"][name] for c in members],
                                       (0.0, 1.0) if name in UNIT_METRICS else (0.0, math.inf))
                   for name in first["metrics"]}
        out[key] = {k: first[k] for k in ("backbone", "arm", "task", "mode", "label_fraction")} | {
            "seeds": [int(c.get("seed", 0)) for c in members], "metrics": metrics}
    return out


# --------------------------------------------------------------------------------------------------
# Plan, ETA and probe
# --------------------------------------------------------------------------------------------------
def probe_path(profile: Profile) -> Path:
    """Where ``--probe`` writes its measured rates."""
    return RESULTS_DIR / f"paper_table_probe-{profile.name}.json"


def rates_for(profile: Profile) -> tuple[dict[str, float], str]:
    """Component rates for the ETA: measured by ``--probe`` on this machine when available, else assumed."""
    path = probe_path(profile)
    if path.is_file():
        doc = json.loads(path.read_text())
        if doc.get("machine", {}).get("cpu") == machine().get("cpu") and doc.get("profile_fingerprint") == \
                profile.fingerprint():
            return {**profile.assumed_rates, **doc["rates"]}, f"measured ({_display(path)})"
    return dict(profile.assumed_rates), "ASSUMED, not measured here (run --probe to measure them on this machine)"


def _cell_seconds(cell: Cell, epochs: int, sizes: dict[str, int], rates: dict[str, float]) -> float:
    """Predicted seconds of one evaluation cell from the component rates (see :func:`probe`)."""
    task, mode, fraction = cell.task, cell.mode, cell.fraction
    n_pool, n_test = (sizes["cls_train"], sizes["cls_test"]) if task == "classification" else (
        sizes["seg_train"], sizes["seg_test"])
    n_val, n_train = 0.2 * n_pool, max(2.0, fraction * 0.8 * n_pool)
    overhead = rates.get("cls_cell_overhead_s" if task == "classification" else "seg_cell_overhead_s",
                         rates.get("cell_overhead_s", 0.0))
    t = overhead + (n_pool + n_test) / rates["decode_img_s"]
    if cell.arm == "raw-pixels":  # one logistic regression per C of the grid
        return t + 5 * (n_train + n_val) / rates.get("raw_fit_img_s", 2000.0)
    if task == "classification" and mode == "linear":
        return t + (n_train + n_val + n_test) / rates["infer_img_s"]
    if task == "classification":
        train_rate, infer_rate = rates["cls_train_img_s"], rates["infer_img_s"]
    else:  # a U-Net forward pass costs about a third of its training step
        train_rate, infer_rate = rates["seg_train_img_s"], 3 * rates["seg_train_img_s"]
    if mode == "linear":  # frozen encoder: no encoder backward pass
        train_rate *= 1.5
    return t + epochs * n_train / train_rate + (epochs * n_val + n_test) / infer_rate


def estimate(profile: Profile, cells: Sequence[Cell], ssl_runs: int, sampling_images: int, sizes: dict[str, int],
             rates: dict[str, float]) -> dict[str, float]:
    """Seconds per phase (sampling, SSL, evaluation) of what is left: ``cells`` not cached yet, ``ssl_runs``
    encoders not pretrained yet and ``sampling_images`` images not sampled yet."""
    sampling = sampling_images * rates["sample_s_per_image"]
    # the rates are per step of batch 32; the cost of a step grows with its batch
    ssl = ssl_runs * profile.ssl_steps * rates["ssl_s_per_step"] * (profile.ssl_batch / 32)
    epochs = {"classification": int(profile.cls_config.get("epochs", 10)),
              "segmentation": int(profile.seg_config.get("epochs", 20))}
    evaluation = sum(_cell_seconds(c, epochs[c.task], sizes, rates) for c in cells)
    return {"sampling_s": sampling, "ssl_s": ssl, "evaluation_s": evaluation, "total_s": sampling + ssl + evaluation}


def planned_sizes(profile: Profile) -> dict[str, int]:
    """Sizes before the data is read (upper bounds for 'everything' profiles: the Kermany/lung-seg counts)."""
    kermany_train, lungs_train = round(5016 * (1 - profile.test_patient_fraction)), round(873 * 0.8)
    return {
        "cls_train": profile.cls_train_images or kermany_train,
        "cls_test": profile.cls_test_images or 5016 - kermany_train,
        "seg_train": profile.seg_train_pairs or lungs_train,
        "seg_test": profile.seg_test_pairs or 873 - lungs_train,
        "ssl_real": profile.ssl_real_images or kermany_train,
    }


REFERENCE_SAMPLING = ("dpmsolver++", 20, 2.0)  # the row of docs/results/sampling.json used to calibrate


def _timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of ``fn()``."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def _reference_s_per_image() -> tuple[float, int] | None:
    """Wall s/image and threads of the reference sampling row in docs/results/sampling.json (idle machine,
    ``REFERENCE_GENERATOR``)."""
    path = RESULTS_DIR / "sampling.json"
    if not path.is_file():
        return None
    doc = json.loads(path.read_text())
    sampler, steps, guidance = REFERENCE_SAMPLING
    for r in doc.get("rows", []):
        if r.get("pipeline") == "cxrsynth" and (r["sampler"], r["steps"], r["guidance"]) == (sampler, steps, guidance):
            return float(r["s_per_image"]), int(doc.get("torch_threads", 2))
    return None


def _sample_cost(generator: Path, device: str, sampler: str, steps: int, guidance: float) -> tuple[float, float, str]:
    """(wall, CPU) seconds per image of sampling a small batch from ``generator``, and the device type."""
    from models.diffusion import CXRDiffusionPipeline

    pipe = CXRDiffusionPipeline.from_pretrained(generator, device=device)
    n = 8 if pipe.device.type == "cpu" else 256
    labels = [pipe.label_names[i % len(pipe.label_names)] for i in range(n)]
    pipe(labels=labels[:2], num_inference_steps=2)  # warm-up
    w, c = _timed(lambda: pipe(labels=labels, seed=0, sampler=sampler, num_inference_steps=steps,
                               guidance_scale=guidance))
    return w / n, c / n, pipe.device.type


def _probe_sampling(profile: Profile, generator: Path | None, device: str, cpu: dict[str, float],
                    wall: dict[str, float]) -> tuple[float, dict[str, Any]]:
    """Time sampling (``generator`` at the profile's settings; None with ``--synthetic``) and return the speed-up
    that converts one-thread CPU seconds to idle wall time, from ``REFERENCE_GENERATOR`` against its
    docs/results/sampling.json row (measured idle on this machine)."""
    sampler, steps, guidance = REFERENCE_SAMPLING
    w, c, dev = _sample_cost(REFERENCE_GENERATOR, device, sampler, steps, guidance)
    wall["sample_per_image_reference"], cpu["sample_per_image_reference"] = w, c
    if generator is not None:
        w, c, _ = _sample_cost(generator, device, profile.sampler, profile.sampling_steps, profile.guidance)
        wall["sample_per_image"], cpu["sample_per_image"] = w, c
        print(f"sampling {generator.name} ({profile.sampler} {profile.sampling_steps}, guidance "
              f"{profile.guidance:g}): {c:.3f} CPU s/image ({w:.3f} s wall)")
    ref = _reference_s_per_image()
    if ref is None or dev != "cpu":
        return 1.0, {"reference": "none (no sampling.json row or not a CPU run): wall = CPU seconds of one thread"}
    speedup = cpu["sample_per_image_reference"] / ref[0]
    return speedup, {"reference": f"docs/results/sampling.json ({REFERENCE_GENERATOR.name}) {sampler} {steps} steps "
                                  f"guidance {guidance:g}: {ref[0]:.3f} s/image wall on {ref[1]} threads, idle machine",
                     "speedup_over_one_thread_cpu_seconds": round(speedup, 3)}


def _probe_units(profile: Profile, data_dir: Path, device: str, cpu: dict[str, float], wall: dict[str, float]) -> None:
    """CPU seconds of the unit costs: decoding, an SSL step at batch 32, a classifier and a segmenter
    training image (at their resolutions), an inference image."""
    import torch
    from torch import nn

    from models.data.folders import images_to_array, list_image_folder
    from models.evaluation import build_segmentation_model, resolve_encoder
    from models.ssl import finetune_augmentation, pretrain

    records = list_image_folder(data_dir / "kermany-pneumonia")[::40][:96]
    x = images_to_array([r.path for r in records], profile.resolution, "pad", threads=2)
    w, c = _timed(lambda: images_to_array([r.path for r in records], profile.resolution, "pad", threads=2))
    wall["decode_per_image"], cpu["decode_per_image"] = w / len(records), c / len(records)
    stamps: list[tuple[float, float]] = []
    cfg = pretrain_config(profile, profile.backbones[0]).replace(max_steps=4, batch_size=32, warmup_steps=0)
    pretrain(x, cfg, None, on_step=lambda *_: stamps.append((time.perf_counter(), time.process_time())),
             device=device)
    wall["ssl_per_step_b32"] = (stamps[-1][0] - stamps[0][0]) / (len(stamps) - 1)  # the first step is warm-up
    cpu["ssl_per_step_b32"] = (stamps[-1][1] - stamps[0][1]) / (len(stamps) - 1)
    print(f"SSL ({profile.ssl_method}, batch 32): {cpu['ssl_per_step_b32']:.2f} CPU s/step")

    dev = torch.device("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")
    enc = resolve_encoder(f"scratch:{profile.backbones[0]}", scratch_kwargs=dict(profile.backbone_kwargs),
                          resolution=profile.resolution)

    def train_cost(model: nn.Module, size: int, augment: nn.Module | None = None, reps: int = 3) -> tuple[float, float]:
        batch = torch.rand(32, 1, size, size, device=dev)
        model.to(dev).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def steps(k: int) -> None:
            for _ in range(k):
                loss = model(batch if augment is None else augment(batch)).float().mean()
                opt.zero_grad()
                loss.backward()
                opt.step()

        steps(1)  # warm-up
        w, c = _timed(lambda: steps(reps))
        return w / (reps * len(batch)), c / (reps * len(batch))

    wall["cls_train_per_image"], cpu["cls_train_per_image"] = train_cost(  # with fine-tuning's augmentation
        nn.Sequential(enc.fresh_copy(), nn.Linear(enc.num_features, 1)), profile.resolution,
        finetune_augmentation(profile.resolution).to(dev))
    decoder = tuple(profile.seg_config.get("decoder_channels", (256, 128, 64, 32, 16)))
    wall["seg_train_per_image"], cpu["seg_train_per_image"] = train_cost(
        build_segmentation_model(enc, decoder), profile.segmentation_resolution)
    m = enc.module.to(dev).eval()
    batch = torch.rand(32, 1, profile.resolution, profile.resolution, device=dev)
    with torch.inference_mode():
        m(batch)
        w, c = _timed(lambda: [m(batch).sum().item() for _ in range(3)])
    wall["infer_per_image"], cpu["infer_per_image"] = w / 96, c / 96
    print(f"classifier training {cpu['cls_train_per_image'] * 1000:.0f}, segmenter training "
          f"{cpu['seg_train_per_image'] * 1000:.0f} ({profile.segmentation_resolution} px), inference "
          f"{cpu['infer_per_image'] * 1000:.1f} CPU ms/image")


def _probe_cells(profile: Profile, data_dir: Path, run_dir: Path, device: str, cpu: dict[str, float],
                 wall: dict[str, float]) -> None:
    """Whole cells (scratch, one epoch) on the profile's real split. The 10% cells give the per-cell overhead
    beyond the unit costs (decoding, validation, bootstrap, HD95, model building); the 100% cells the
    effective cost of a training image inside the real loop (augmentation, batching, schedules)."""
    data = prepare_data(profile, data_dir, run_dir)
    one_epoch = dataclasses.replace(profile, cls_config={**profile.cls_config, "epochs": 1},
                                    seg_config={**profile.seg_config, "epochs": 1})
    sizes = {"cls_train": data["cls_train"]["images"], "cls_test": data["cls_test"]["images"],
             "seg_train": data["seg_train"]["pairs"], "seg_test": data["seg_test"]["pairs"]}
    backbone = profile.backbones[0]
    for task, mode, f in (("classification", "linear", 0.1), ("classification", "finetune", 1.0),
                          ("segmentation", "finetune", 0.1), ("segmentation", "finetune", 1.0)):
        w, c = _timed(lambda task=task, mode=mode, f=f: run_cell(  # type: ignore[misc]
            one_epoch, Cell(backbone, "scratch", task, mode, f), f"scratch:{backbone}", run_dir, device,
            report_dir=run_dir / "probe-reports"))
        name = f"{task}_{mode}_{f:g}_cell"
        wall[name], cpu[name] = w, c
        print(f"{task} {mode} cell ({f:.0%} labels, 1 epoch): {c:.1f} CPU s")
    base = {**_idle_rates(cpu, 1.0), "cls_cell_overhead_s": 0.0, "seg_cell_overhead_s": 0.0}
    cpu["cls_cell_overhead"] = max(0.0, cpu["classification_linear_0.1_cell"] - _cell_seconds(
        Cell(backbone, "scratch", "classification", "linear", 0.1), 1, sizes, base))
    cpu["seg_cell_overhead"] = max(0.0, cpu["segmentation_finetune_0.1_cell"] - _cell_seconds(
        Cell(backbone, "scratch", "segmentation", "finetune", 0.1), 1, sizes, base))
    for task, key, pool in (("classification", "cls", "cls_train"), ("segmentation", "seg", "seg_train")):
        with_overhead = {**base, f"{key}_cell_overhead_s": cpu[f"{key}_cell_overhead"]}
        # the predicted cell minus its training part, then the rest of the measured cell spread over the images
        rest = _cell_seconds(Cell(backbone, "scratch", task, "finetune", 1.0), 1, sizes, with_overhead) - \
            0.8 * sizes[pool] * cpu[f"{key}_train_per_image"]
        effective = (cpu[f"{task}_finetune_1_cell"] - rest) / (0.8 * sizes[pool])
        cpu[f"{key}_train_per_image_microbenchmark"] = cpu[f"{key}_train_per_image"]
        cpu[f"{key}_train_per_image"] = max(cpu[f"{key}_train_per_image"], effective)
    print(f"per-cell overhead: classification {cpu['cls_cell_overhead']:.1f}, segmentation "
          f"{cpu['seg_cell_overhead']:.1f} CPU s; training in the loop: classification "
          f"{cpu['cls_train_per_image'] * 1000:.0f}, segmentation {cpu['seg_train_per_image'] * 1000:.0f} CPU ms/image")


def probe(profile: Profile, data_dir: Path, generator: Path | None, device: str, run_dir: Path) -> dict[str, float]:
    """Time each component of the profile on real data and write ``docs/results/paper_table_probe-<profile>.json``.

    This machine is shared, so wall times are not what an idle run will see. The probe therefore runs
    torch on ONE thread and measures the CPU seconds of each unit of work (sampling an image, an SSL step at
    batch 32, a supervised training image, an inference image, decoding an image, and whole evaluation
    cells for the per-cell overhead); CPU seconds barely depend on the load. It converts them to idle
    wall time with one factor: the speed-up of the reference sampling row of ``docs/results/sampling.json``
    (measured on this machine, idle, 2 threads) over the same sampling here on one thread. That factor is
    an assumption for the other components (they parallelise differently), stated in the JSON.
    ``generator=None`` (``--synthetic``: nothing is sampled) leaves the sampling rate assumed."""
    import torch

    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)
    cpu: dict[str, float] = {}
    wall: dict[str, float] = {}
    load_before = os.getloadavg()
    speedup, calibration = _probe_sampling(profile, generator, device, cpu, wall)
    _probe_units(profile, data_dir, device, cpu, wall)
    _probe_cells(profile, data_dir, run_dir, device, cpu, wall)
    rates = _idle_rates(cpu, speedup)
    torch.set_num_threads(threads_before)
    write_result(f"paper_table_probe-{profile.name}", {
        "profile": profile.name, "profile_fingerprint": profile.fingerprint(), "device": device,
        "torch_threads_measured": 1, "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "cpu_seconds_one_thread": cpu, "wall_seconds_under_this_load": wall, "calibration": calibration,
        "rates": rates,
        "notes": "rates = predicted wall time on an idle machine: CPU seconds of one thread divided by the "
                 "calibration speed-up (an assumption for components other than sampling). SSL per step at "
                 "batch 32 (mean of steps 2-4). Training cost per image: the larger of a microbenchmark "
                 "(forward+backward+AdamW on random 32-image batches) and what a whole one-epoch 100% cell "
                 "implies; per-cell overheads from one-epoch 10% cells. Segmentation at seg_resolution.",
    }, probe_path(profile))
    print(f"idle-machine estimate: {json.dumps({k: round(v, 4) for k, v in rates.items()})}")
    return rates


def _idle_rates(cpu: dict[str, float], speedup: float) -> dict[str, float]:
    """The ETA's rates from one-thread CPU seconds and a speed-up factor."""
    rates = {
        "ssl_s_per_step": cpu["ssl_per_step_b32"] / speedup,
        "cls_train_img_s": speedup / cpu["cls_train_per_image"],
        "seg_train_img_s": speedup / cpu["seg_train_per_image"],
        "infer_img_s": speedup / cpu["infer_per_image"],
        "decode_img_s": 1.0 / cpu["decode_per_image"],  # PIL decoding runs in its own 2 threads already
        "cls_cell_overhead_s": cpu.get("cls_cell_overhead", 0.0) / speedup,
        "seg_cell_overhead_s": cpu.get("seg_cell_overhead", 0.0) / speedup,
    }
    if "sample_per_image" in cpu:
        rates["sample_s_per_image"] = cpu["sample_per_image"] / speedup
    return rates


# --------------------------------------------------------------------------------------------------
# Outputs: table, plots, shipped encoder
# --------------------------------------------------------------------------------------------------
def _fmt(m: dict[str, float] | None, digits: int = 3) -> str:
    if m is None:
        return "—"
    if m["value"] != m["value"]:
        return "n/a"
    return f"{m['value']:.{digits}f} [{m['low']:.{digits}f}, {m['high']:.{digits}f}]"


def synthetic_words(syn: dict[str, Any], multiplier: int) -> str:
    """One sentence on where the synthetic arms' images came from (for the table and the model card)."""
    if syn.get("source") == "webdataset export":
        gen = syn.get("generator") or {}
        ds = syn.get("dataset") or {}
        # the 4x arm needs that many images: an export too small for it only feeds the 1x arms
        reads = (f"the first {syn['one_x']:,} (1x) and {syn['multiplied']:,} ({multiplier}x)"
                 if syn["multiplied"] <= syn["images_in_export"] else f"the first {syn['one_x']:,} (1x)")
        return (f"Synthetic: {reads} of the "
                f"{syn['images_in_export']:,} images of the WebDataset export `{syn['location']}` (dataset "
                f"{ds.get('name') or ds.get('id') or 'not recorded'}, {ds.get('version') or 'no card'}; generator "
                f"{gen.get('name') or gen.get('id') or 'not recorded'}; privacy gate "
                f"{syn.get('privacy_gate') or 'not recorded'}), streamed from its shards.")
    if syn.get("source") == "sampled in process":
        return (f"Synthetic: {syn['one_x']:,} (1x) and {syn['multiplied']:,} ({multiplier}x) images sampled in "
                f"process from `{syn['generator']}` ({syn['sampler']} {syn['steps']} steps, guidance "
                f"{syn['guidance']:g}, seed {syn['seed']}, labels in the real class balance), "
                f"{syn.get('resolution', '?')} px resized to {syn.get('resized_to', '?')} px.")
    return f"Synthetic: {syn.get('source', 'none')}."


def _header(doc: dict[str, Any]) -> list[str]:
    p = doc["profile"]
    seeds = ", ".join(str(s) for s in p["seeds_small_fractions"])
    return [f"# Paper table: SSL on synthetic vs real chest X-rays ({p['name']})", "",
            f"- command: `{doc['command']}`", f"- commit: `{doc['commit']}`",
            f"- machine: {machine_line(doc['machine'])}",
            f"- date: {doc['date']}; this invocation {doc['timings']['total_s'] / 60:.1f} min; compute of all "
            f"cells {doc['compute_seconds']['cells'] / 60:.1f} min + SSL {doc['compute_seconds']['ssl'] / 60:.1f} min "
            "(cached parts included)", f"- profile: {p['note']}",
            f"- seeds: label fractions below 100% run at evaluation seeds {seeds} (label subsample, head "
            "initialisation, batch order and validation patients; the same encoder); 100% at seed 0. Values below "
            f"100% are the {SEED_CI_WORDS}. A single seed shows its own bootstrap CI.",
            *_provenance_lines(doc), ""]


def _provenance_lines(doc: dict[str, Any]) -> list[str]:
    """``--note`` of this run and of the documents merged into it: how and where each part was computed."""
    lines = [f"- provenance: {doc['provenance_note']}"] if doc.get("provenance_note") else []
    seen: set[tuple[str, str]] = set()

    def walk(merged: list[dict[str, Any]], via: str) -> None:
        for m in merged:
            if m.get("provenance_note") and (m["file"], str(m.get("commit"))) not in seen:
                seen.add((m["file"], str(m.get("commit"))))
                left = m.get("synthetic_cells_left_out") or 0
                lines.append(f"- provenance of merged `{m['file']}` (commit {m['commit']}{via}, arms "
                             f"{', '.join(m.get('arms') or [])}"
                             + (f"; its {left} synthetic-arm cells, from another export, left out" if left else "")
                             + f"): {m['provenance_note']}")
            walk(m.get("merged_from") or [], f", merged into `{m['file']}`")

    walk(doc.get("merged_from", []), "")
    return lines


def _data_section(doc: dict[str, Any]) -> list[str]:
    d, p = doc["data"], doc["profile"]
    lines = ["## Data", "",
             f"Kermany split once, patient-level ({d['test_split']['test_patients']} test patients, seed "
             f"{d['test_split']['seed']}); lung segmentation uses the lung-seg pairs of the same patients "
             f"(at {p.get('seg_resolution') or p['resolution']} px).", "",
             "| set | size | labels |", "|---|---|---|"]
    for name in ("cls_train", "cls_test", "seg_train", "seg_test", "ssl_real"):
        size = d[name].get("images", d[name].get("pairs"))
        lines.append(f"| {name} | {size} | {', '.join(f'{k}: {v}' for k, v in d[name]['counts'].items())} |")
    return [*lines, "", synthetic_words(doc["synthetic"], p["synthetic_multiplier"]), *_merged_source_lines(doc), "",
            f"SSL: {p['ssl_method']}, {p['ssl_steps']} steps of batch {p['ssl_batch']} "
            f"({p['ssl_steps'] * p['ssl_batch']:,} image-views) for every pretrained arm (seed {p['seed']}). "
            f"Baseline `raw-pixels`: logistic regression on standardised {RAW_PIXELS}x{RAW_PIXELS} pixels, C chosen "
            "on the validation split (classification, linear mode only).", "", f"> {CAVEAT}", ""]


def _merged_source_lines(doc: dict[str, Any]) -> list[str]:
    """For each merged document whose synthetic arms read another source than this run and have cells in the
    table: which arms, and that source (so no row is credited to the wrong export). An arm that document had
    merged in turn from yet another source is credited to that one (``merged_from`` nests)."""
    present = {c["arm"] for c in doc["cells"].values()}
    return _source_lines(doc.get("merged_from", []), present, doc["profile"]["synthetic_multiplier"])


def _source_lines(entries: Sequence[dict[str, Any]], arms_wanted: set[str], multiplier: int) -> list[str]:
    lines: list[str] = []
    for m in entries:
        arms = [a for a in m.get("synthetic_arms_from_another_source") or [] if a in arms_wanted]
        deeper = {a for n in m.get("merged_from") or [] for a in n.get("synthetic_arms_from_another_source") or []}
        own = [a for a in arms if a not in deeper]
        if own and (m.get("synthetic") or {}).get("source") not in (None, "none (no synthetic arm selected)"):
            words = synthetic_words(m["synthetic"], multiplier)
            lines += ["", f"Arm(s) {', '.join(f'`{a}`' for a in own)} merged from `{m['file']}`, another "
                          f"source: {words[0].lower()}{words[1:]}"]
        lines += _source_lines(m.get("merged_from") or [], {a for a in arms if a in deeper}, multiplier)
    return lines


def markdown_table(doc: dict[str, Any]) -> str:
    """The results as Markdown: one table per backbone and task, arms x modes by label fraction."""
    agg: dict[str, dict[str, Any]] = doc["aggregated"]
    fractions = doc["selection"]["fractions"]
    lines = _header(doc) + _data_section(doc)
    for backbone in doc["profile"]["backbones"]:
        for task in doc["selection"]["tasks"]:
            metric = PRIMARY[task]
            lines += [f"## {task}, {backbone}: test {metric.upper()} [95% CI]", "",
                      "| arm | mode | " + " | ".join(f"{f:.0%} labels" for f in fractions) + " |",
                      "|---|---|" + "---|" * len(fractions)]
            for arm in doc["selection"]["arms"]:
                spec = arm_spec(arm)
                for mode in doc["selection"]["modes"]:
                    if task not in spec.tasks or mode not in spec.modes:
                        continue
                    row = [(agg.get(group_key(backbone, arm, task, mode, f)) or {}).get("metrics", {}).get(metric)
                           for f in fractions]
                    lines.append(f"| {arm} | {mode} | " + " | ".join(_fmt(m) for m in row) + " |")
            lines.append("")
    lines += ["## Pretraining runs", "", "| backbone | arm | images | data | steps | final loss | wall s |",
              "|---|---|---|---|---|---|---|"]
    for key, p in doc["pretraining"].items():
        backbone, arm = key.split("|")
        loss = p.get("final_loss")
        lines.append(f"| {backbone} | {arm} | {p['images']} | {p.get('data') or ''} | {p['steps']} | "
                     f"{'' if loss is None else f'{loss:.4f}'} | {p['wall_seconds']} |")
    if doc.get("shipped_encoder"):
        s = doc["shipped_encoder"]
        lines += ["", f"Shipped encoder: arm `{s['arm']}` (best mean primary metric of the arms without real "
                      f"images in pretraining: {s['score']:.4f}) exported fp16 to `{s['path']}`."]
    elif doc.get("shipped_encoder_not_exported"):
        lines += ["", f"Shipped encoder not exported by this run: {doc['shipped_encoder_not_exported']['reason']}."]
    lines += ["", "Per-seed cells, secondary metrics (F1, accuracy, sensitivity, specificity, IoU, HD95), selected "
              "epochs / C and split sizes are in the JSON beside this file.", ""]
    return "\n".join(lines)


def plot(doc: dict[str, Any], out_dir: Path, stem: str) -> list[Path]:
    """Label-efficiency curves: one PNG per backbone, tasks x modes, one line per arm with 95% CIs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    tasks, modes, arms = doc["selection"]["tasks"], doc["selection"]["modes"], doc["selection"]["arms"]
    fractions = doc["selection"]["fractions"]
    for backbone in doc["profile"]["backbones"]:
        fig, axes = plt.subplots(len(tasks), len(modes), figsize=(5 * len(modes), 3.8 * len(tasks)), squeeze=False)
        for r, task in enumerate(tasks):
            for c, mode in enumerate(modes):
                _plot_panel(axes[r][c], doc["aggregated"], backbone, arms, task, mode, fractions)
        axes[0][0].legend(fontsize=8)
        fig.suptitle(f"Label efficiency, {backbone} {doc['profile']['resolution']} px ({doc['profile']['name']}; "
                     "bars: 95% CI, mean over seeds below 100%)")
        fig.tight_layout()
        path = out_dir / f"{stem}-{backbone}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _plot_panel(ax: Any, agg: dict[str, dict[str, Any]], backbone: str, arms: Sequence[str], task: str, mode: str,
                fractions: Sequence[float]) -> None:
    metric = PRIMARY[task]
    for k, arm in enumerate(arms):
        pts = [(f, (agg.get(group_key(backbone, arm, task, mode, f)) or {}).get("metrics", {}).get(metric))
               for f in fractions]
        pts = [(f, m) for f, m in pts if m is not None and m["value"] == m["value"]]
        if not pts:
            continue
        xs = np.array([f for f, _ in pts]) * (1 + 0.04 * (k - len(arms) / 2))  # dodge overlaps
        ys = np.array([m["value"] for _, m in pts])
        err = np.array([[m["value"] - m["low"] for _, m in pts], [m["high"] - m["value"] for _, m in pts]])
        # one colour per arm in every panel (the legend is drawn once, and a panel may lack an arm)
        ax.errorbar(xs, ys, yerr=np.clip(err, 0, None), marker="o", capsize=3, label=arm, color=f"C{k % 10}")
    ax.set_xscale("log")
    ax.set_xticks(fractions, [f"{f:.0%}" for f in fractions])
    ax.set_xlabel("labelled share of the training split")
    ax.set_ylabel(f"test {metric.upper()}")
    ax.set_title(f"{task}, {mode}")
    ax.grid(alpha=0.3)


def _slots(aggregated: dict[str, dict[str, Any]], backbone: str, arm: str) -> set[tuple[str, str, float]]:
    """The (task, mode, label fraction) groups an arm has results for."""
    return {(g["task"], g["mode"], g["label_fraction"]) for g in aggregated.values()
            if g["backbone"] == backbone and g["arm"] == arm}


def arm_score(aggregated: dict[str, dict[str, Any]], backbone: str, arm: str,
              slots: set[tuple[str, str, float]] | None = None) -> float:
    """Mean primary metric (AUC, Dice; each cell's mean over seeds) over the arm's cells, or over ``slots`` of
    them (the groups every candidate has, so an arm missing its low-Dice cells does not win by absence): how
    the shipped encoder is chosen."""
    vals = [g["metrics"][PRIMARY[g["task"]]]["value"] for g in aggregated.values()
            if g["backbone"] == backbone and g["arm"] == arm
            and (slots is None or (g["task"], g["mode"], g["label_fraction"]) in slots)]
    vals = [v for v in vals if v == v]
    return float(np.mean(vals)) if vals else float("nan")


def _budget_words(doc: dict[str, Any], backbone: str, arm: str, cfg: dict[str, Any]) -> str:
    """The pretraining budget of the shipped arm, for its card: steps, batch, image-views and wall time."""
    run = doc.get("pretraining", {}).get(f"{backbone}|{arm}", {})
    steps = int(run.get("steps", cfg["pretraining"].get("steps", 0)))
    batch = int(cfg["pretraining"].get("batch_size") or doc["profile"].get("ssl_batch") or 0)
    views = f" = {steps * batch:,} image-views" if batch else ""
    # the SSL may have run on another machine than the evaluation (--merge, --encoder): the device it recorded
    device = cfg["pretraining"].get("device")
    wall = (f", {run['wall_seconds'] / 60:.0f} min of wall time" + (f" ({device})" if device else "")
            if run.get("wall_seconds") else "")
    return (f"Budget: {cfg['method']} on {cfg['architecture']} at {cfg['resolution']} px, {steps:,} steps of batch "
            f"{batch}{views}{wall}.")


class ExportElsewhere(Exception):
    """The best arm to ship is not in this run folder (it came with --merge)."""

    def __init__(self, message: str, arm: str, scores: dict[str, float]) -> None:
        super().__init__(message)
        self.arm, self.scores = arm, scores


def export_shipped_encoder(doc: dict[str, Any], run_dir: Path, backbone: str, export_dir: Path) -> dict[str, Any]:
    """Export the best arm without real images in pretraining (fp16, model card with its results) to
    ``export_dir``; ``config.json`` carries the results as ``metrics`` (shown by ``GET /v1/encoders``)."""
    from models.ssl import export_encoder, load_encoder, read_encoder_config

    agg = doc["aggregated"]
    candidates = [arm for arm in NO_REAL_ARMS if arm in doc["selection"]["arms"] and _slots(agg, backbone, arm)]
    common = set.intersection(*(_slots(agg, backbone, a) for a in candidates)) if candidates else set()
    scores = {arm: arm_score(agg, backbone, arm, common) for arm in candidates}
    scores = {a: s for a, s in scores.items() if s == s}
    if not scores:
        raise SystemExit("no arm without real images was evaluated: nothing to export")
    best = max(scores, key=lambda a: (scores[a], -NO_REAL_ARMS.index(a)))
    if not (encoder_dir(run_dir, backbone, best) / "config.json").is_file():
        # a merged arm: its encoder and its synthetic source belong to another run folder (its card would
        # describe this run's source); it is exported from a run that holds it (--encoder ARM=DIR)
        raise ExportElsewhere(f"the best arm without real images, {best!r} ({scores[best]:.4f}), is merged from "
                              "another run: export it from a run of that arm (--arms "
                              f"{best} --encoder {best}=ITS_EXPORTED_ENCODER --merge THIS_JSON)", best, scores)
    cfg = read_encoder_config(encoder_dir(run_dir, backbone, best))
    groups = sorted((g for g in agg.values() if g["backbone"] == backbone and g["arm"] == best),
                    key=lambda g: (g["task"], g["mode"], g["label_fraction"]))
    # The same cells of the yardsticks beside it: what a hospital gains over training from scratch, over SSL on
    # real images, and over logistic regression on raw pixels (linear probe only).
    others = [a for a in ("scratch", "real", "raw-pixels") if any(g["arm"] == a for g in agg.values())]
    names = {"scratch": "scratch", "real": "SSL on real", "raw-pixels": "raw pixels"}
    rows = ["| task | mode | labels | seeds | metric | this encoder [95% CI] | "
            + " | ".join(names[a] for a in others) + " |",
            "|---|---|---|---|---|---|" + "---|" * len(others)]
    for g in groups:
        metric = PRIMARY[g["task"]]
        beside = [agg.get(group_key(backbone, a, g["task"], g["mode"], g["label_fraction"])) for a in others]
        rows.append(f"| {g['task']} | {g['mode']} | {g['label_fraction']:.0%} | {len(g['seeds'])} | {metric} | "
                    f"{_fmt(g['metrics'][metric])} | "
                    + " | ".join(_fmt(o["metrics"][metric]) if o else "—" for o in beside) + " |")
    notes = "\n".join([
        f"Pretrained on synthetic images only ({cfg['pretraining']['data']['num_images']:,} images); no real "
        f"image was used in pretraining. {synthetic_words(doc['synthetic'], doc['profile']['synthetic_multiplier'])} "
        f"Chosen as arm `{best}` of `benchmarks/paper_table.py` (profile {doc['profile']['name']}), the best of "
        f"{sorted(scores)} by mean test AUC / Dice over the {len(common)} cell groups they all have.", "",
        _budget_words(doc, backbone, best, cfg), "",
        f"Evaluated with `models.evaluation` on a patient-level test split of Kermany / lung-seg "
        f"({doc['data']['cls_test']['images']} test images, {doc['data']['seg_test']['pairs']} test pairs); "
        f"below 100% labels the {SEED_CI_WORDS}:", "",
        *rows, "",
        f"Command `{doc['command'].split(' --note ')[0]}`, commit `{doc['commit']}`, {machine_line(doc['machine'])}. "
        f"{CAVEAT}",
        *([f"Provenance: {doc['provenance_note']}"] if doc.get("provenance_note") else []),
        *([f"Parts of this table were merged from earlier runs (`--merge`); the provenance of each is in the "
           f"results this command wrote, `paper_table-{doc['profile']['name']}.md`."]
          if doc.get("merged_from") else []),
    ])
    out = export_encoder(export_dir, load_encoder(encoder_dir(run_dir, backbone, best)),
                         model_name=cfg["architecture"], timm_kwargs=cfg["timm_kwargs"],
                         resolution=cfg["resolution"], mean=cfg["mean"][0], std=cfg["std"][0], method=cfg["method"],
                         # where a --encoder copy came from names the run's input, not the shipped encoder's history
                         pretraining={k: v for k, v in cfg["pretraining"].items() if k != "encoder_from"},
                         aspect_mode=cfg["aspect_mode"], fp16=True, notes=notes)
    exported = json.loads((out / "config.json").read_text())
    exported["metrics"] = {
        "source": f"benchmarks/paper_table.py --profile {doc['profile']['name']} (commit {doc['commit']})",
        "arm": best, "synthetic": doc["synthetic"],
        "cells": {f"{g['task']}/{g['mode']}/{g['label_fraction']:g}": g["metrics"] for g in groups},
    }
    (out / "config.json").write_text(json.dumps(exported, indent=2) + "\n")
    size_mb = (out / "model.safetensors").stat().st_size / 2**20
    return {"arm": best, "score": scores[best], "scores": scores, "scored_groups": len(common), "path": _display(out),
            "size_mb": round(size_mb, 1)}


def _display(path: Path) -> str:
    p = path.resolve()
    return str(p.relative_to(REPO_ROOT)) if p.is_relative_to(REPO_ROOT) else str(p)


# --------------------------------------------------------------------------------------------------
# Main: arguments, setup, plan, run, outputs
# --------------------------------------------------------------------------------------------------
def _csv(text: str | None, allowed: Sequence[str], what: str) -> list[str]:
    if not text:
        return list(allowed)
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad:
        raise SystemExit(f"unknown {what}: {bad}; choose from {list(allowed)}")
    return [a for a in allowed if a in items]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (``--help`` prints the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=sorted(PROFILES), default="cpu-small")
    ap.add_argument("--data-dir", default=None, help="real data (default: $CXR_DATA_DIR or ../shared/data)")
    ap.add_argument("--synthetic", default=None, metavar="PATH",
                    help="WebDataset shards for the synthetic arms, streamed: an extracted `cxrsynth datasets export "
                         "ID --format webdataset` folder, a folder of *.tar, or s3://bucket/prefix (default: sample "
                         "in process from --generator)")
    ap.add_argument("--generator", default=str(DEFAULT_GENERATOR), help="generator to sample from without --synthetic")
    ap.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="synthetic images and run folders (not the repo)")
    ap.add_argument("--out-dir", default=None, help="table, JSON and plots (default: docs/results, or the run "
                                                      "folder for smoke)")
    ap.add_argument("--export-dir", default=None,
                    help=f"where the shipped encoder goes (default: {_display(SHIPPED_ENCODER)} for "
                         f"{', '.join(EXPORTING_PROFILES)})")
    ap.add_argument("--no-export", action="store_true", help="do not export the shipped encoder")
    ap.add_argument("--arms", default=None, help=f"comma-separated subset of {','.join(ARMS)}")
    ap.add_argument("--tasks", default=None, help=",".join(TASKS))
    ap.add_argument("--modes", default=None, help=",".join(MODES))
    ap.add_argument("--fractions", default=None, help="label fractions, e.g. 0.01,0.1,1")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    ap.add_argument("--plan-only", action="store_true", help="print the plan and ETA, run nothing")
    ap.add_argument("--cached-only", action="store_true",
                    help="write the table from what the run folder holds, computing nothing: arms whose SSL has not "
                         "finished and cell groups missing a seed are left out (shown as —)")
    ap.add_argument("--probe", action="store_true", help="time each component, write the probe JSON, stop")
    ap.add_argument("--note", default="", help="how this run was made (e.g. what else the machine ran, which "
                                               "cached parts came from where): kept in the JSON and the table")
    ap.add_argument("--encoder", action="append", default=[], metavar="ARM=DIR",
                    help="take ARM's encoder from an exported encoder folder (e.g. the shipped "
                         f"{_display(SHIPPED_ENCODER)}) instead of pretraining it: it must carry this profile's "
                         "backbone and SSL recipe (and, for a synthetic arm, its export's version), and its "
                         "cells are computed from it; repeatable")
    ap.add_argument("--merge", action="append", default=[], metavar="RESULTS_JSON",
                    help="results JSON of an earlier run of the same profile (e.g. a committed docs/results/"
                         "paper_table-cpu-12.json): its cells and pretraining records join this run's, so a "
                         "table too long for one sitting is built arm by arm across machines; repeatable")
    return ap.parse_args(argv)


@dataclass
class Setup:
    """A run's resolved inputs: profile, selection, sources, run folder and its cells."""

    profile: Profile
    arms: list[str]
    tasks: list[str]
    modes: list[str]
    fractions: list[float]
    data_dir: Path
    generator: Path
    synthetic: SyntheticExport | None
    cache_dir: Path
    run_dir: Path
    cells: CellStore
    command: str
    commit: str = field(default_factory=commit)  # of the code that runs: taken at the start, not at the end
    given: dict[str, GivenEncoder] = field(default_factory=dict)  # --encoder: arms not pretrained here


def setup(args: argparse.Namespace, argv: list[str] | None) -> Setup:
    """Resolve the arguments: selection, data, the synthetic source (checked against the profile), the run
    folder (named by the profile's fingerprint and the synthetic source) and its cells."""
    from models.diffusion.testing import shared_data_dir

    profile = PROFILES[args.profile]
    arms = _csv(args.arms, ARMS, "arms")
    fractions = sorted({float(f) for f in args.fractions.split(",")}) if args.fractions else list(profile.fractions)
    if any(not 0 < f <= 1 for f in fractions):
        raise SystemExit("fractions must be in (0, 1]")
    synthetic = open_synthetic(args.synthetic) if args.synthetic else None
    given = given_encoders(args.encoder, profile, arms)
    to_pretrain = [a for a in arms if a in SYNTHETIC_ARMS and a not in given]  # these read synthetic images
    if profile.synthetic_min_images and to_pretrain:
        have = synthetic.index.num_samples if synthetic else 0
        if have < profile.synthetic_min_images:
            raise SystemExit(f"profile {profile.name} pretrains its synthetic arms on a WebDataset export of at least "
                             f"{profile.synthetic_min_images:,} images: pass --synthetic PATH"
                             + (f" ({args.synthetic} holds {have:,})" if synthetic else ""))
    generator = Path(args.generator)
    tag = _run_tag(synthetic, generator, given, to_pretrain)
    cache_dir = Path(args.cache_dir).expanduser()
    run_dir = cache_dir / "runs" / f"{profile.name}-{profile.fingerprint()}-{tag}"
    run_dir.mkdir(parents=True, exist_ok=True)
    for enc in given.values():
        install_given_encoder(enc, run_dir, profile.backbones[0])
    return Setup(profile, arms, _csv(args.tasks, TASKS, "tasks"), _csv(args.modes, MODES, "modes"), fractions,
                 Path(args.data_dir) if args.data_dir else shared_data_dir(), generator, synthetic, cache_dir,
                 run_dir, CellStore(run_dir / "cells.json"),
                 " ".join(["python benchmarks/paper_table.py", *(argv if argv is not None else sys.argv[1:])]),
                 given=given)


def _run_tag(synthetic: SyntheticExport | None, generator: Path, given: dict[str, GivenEncoder],
             to_pretrain: Sequence[str]) -> str:
    """The synthetic source part of the run folder's name: the ``--synthetic`` export, else the export the given
    synthetic encoders were pretrained on, else the generator sampled in process. ``SystemExit`` when they
    disagree (the run's synthetic cells would come from two sources)."""
    tags = {enc.source_tag() for a, enc in given.items() if a in SYNTHETIC_ARMS}
    if synthetic is not None:
        tags.add(f"wds{synthetic.identity()}")
    elif to_pretrain or not tags:
        tags.add(f"gen{generator_fingerprint(generator)[:8]}")
    if len(tags) > 1:
        raise SystemExit(f"the synthetic arms of one run must share their source: --encoder and --synthetic name "
                         f"{len(tags)} ({', '.join(sorted(str(t) for t in tags))}); run them separately and --merge")
    return str(tags.pop())


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 7200 else f"{seconds / 60:.1f} min"


def show_plan(s: Setup, log: Callable[[str], None]) -> dict[str, Any]:
    """Print the sizes, the cells and the ETA of what is left (the rates say whether they were measured)."""
    p = s.profile
    rates, rate_source = rates_for(p)
    sizes = planned_sizes(p)
    splits = s.run_dir / "data" / "splits.json"
    if splits.is_file():  # the data is prepared already: its exact sizes
        d = json.loads(splits.read_text())
        sizes = {k: int(d[k].get("images", d[k].get("pairs", 0))) for k in sizes}
    plan = plan_cells(p, s.arms, s.tasks, s.modes, s.fractions)
    todo = [c for c in plan if c.key not in s.cells]
    ssl_left = [(b, a) for b in p.backbones for a in s.arms
                if arm_spec(a).pretrained and not (encoder_dir(s.run_dir, b, a) / "config.json").is_file()]
    syn_total = sizes["ssl_real"] * p.synthetic_multiplier
    reads = any(a in SYNTHETIC_ARMS and a not in s.given for a in s.arms)  # some arm pretrains on synthetic images
    sample = s.synthetic is None and reads and not (
        s.cache_dir / "synthetic" / synthetic_cache_key(p, s.generator, syn_total) / "images.npz").is_file()
    eta = estimate(p, todo, len(ssl_left), syn_total if sample else 0, sizes, rates)
    log(f"profile {p.name} ({p.note}); run folder {s.run_dir}")
    log(f"  backbones {', '.join(p.backbones)} at {p.resolution} px (segmentation {p.segmentation_resolution} px); "
        f"arms {', '.join(s.arms)}; tasks {', '.join(s.tasks)}; modes {', '.join(s.modes)}; fractions "
        f"{', '.join(f'{f:g}' for f in s.fractions)}; seeds {p.seeds_small_fractions} below 100%")
    source = f"--synthetic {s.synthetic.location} ({s.synthetic.index.num_samples:,} images)" if s.synthetic else \
        f"sampled from {s.generator.name}{'' if sample else ' (cached)'}" if reads else "not read"
    if s.given:
        source += "; " + ", ".join(f"arm {a}: encoder from {_display(e.path)}" for a, e in s.given.items())
    log(f"  data: cls train {sizes['cls_train']} / test {sizes['cls_test']}, seg train {sizes['seg_train']} / test "
        f"{sizes['seg_test']}, SSL real {sizes['ssl_real']}, synthetic {sizes['ssl_real']} and {syn_total} {source}")
    log(f"  SSL {p.ssl_method} {p.ssl_steps} steps x batch {p.ssl_batch} = {p.ssl_steps * p.ssl_batch:,} image-views "
        f"per arm ({len(ssl_left)} run(s) left); cells {len(plan)} ({len(plan) - len(todo)} cached)")
    log(f"  ETA {_duration(eta['total_s'])} = sampling {_duration(eta['sampling_s'])} + SSL {_duration(eta['ssl_s'])} "
        f"+ evaluation {_duration(eta['evaluation_s'])}; rates {rate_source}")
    return {"eta": eta, "rates": rates, "rate_source": rate_source, "sizes": sizes, "cells": len(plan),
            "cells_cached": len(plan) - len(todo), "run_dir": str(s.run_dir), "plan": plan}


def pretrain_all(s: Setup, data: dict[str, Any], device: str, log: Callable[[str], None],
                 timings: dict[str, float]) -> tuple[dict[str, str | Path], dict[str, Any], dict[str, Any]]:
    """The synthetic source's data and every selected arm's encoder: ``({backbone|arm: encoder}, pretraining
    records, synthetic source description)``."""
    t = time.perf_counter()
    arm_data, syn_info = ssl_data(s.profile, s.run_dir, data, [a for a in s.arms if a not in s.given], s.synthetic,
                                  s.generator, s.cache_dir, device, log)
    given_syn = [e.synthetic for a, e in s.given.items() if a in SYNTHETIC_ARMS and e.synthetic]
    if given_syn and s.synthetic is None and not any(a in SYNTHETIC_ARMS for a in arm_data):
        # the export itself is not read: what the given encoder recorded of it describes the source
        n_real = int(data["ssl_real"]["images"])
        syn_info = {**given_syn[0], "one_x": n_real, "multiplied": s.profile.synthetic_multiplier * n_real,
                    "multiplier": s.profile.synthetic_multiplier, "described_by": "the --encoder config"}
    timings["synthetic_s"] = time.perf_counter() - t
    t = time.perf_counter()
    encoders: dict[str, str | Path] = {}
    pre: dict[str, Any] = {}
    for backbone in s.profile.backbones:
        for arm in s.arms:
            if arm in arm_data or arm in s.given:  # a given encoder is in place: pretrain_arm only reads it
                encoders[f"{backbone}|{arm}"], pre[f"{backbone}|{arm}"] = pretrain_arm(
                    s.profile, backbone, arm, arm_data.get(arm), s.run_dir, device, log)
            elif arm == "scratch":
                encoders[f"{backbone}|{arm}"] = f"scratch:{backbone}"
    timings["ssl_s"] = time.perf_counter() - t
    return encoders, pre, syn_info


def restrict_to_cached(s: Setup, plan: Sequence[Cell], log: Callable[[str], None]) -> list[Cell]:
    """``--cached-only``: drop the arms whose SSL has not finished (from ``s.arms``) and the cell groups of
    ``plan`` with any seed not yet computed; returns the cells left (all in the cache).

    Why: a long profile is cut by the end of a sitting; what finished is still worth a table, and a group
    with some of its seeds would report a mean and CI over other seeds than its neighbours.
    """
    done = [a for a in s.arms if not arm_spec(a).pretrained
            or all((encoder_dir(s.run_dir, b, a) / "config.json").is_file() for b in s.profile.backbones)]
    if dropped := [a for a in s.arms if a not in done]:
        log(f"--cached-only: arm(s) {', '.join(dropped)} left out (SSL not finished)")
    s.arms = done
    groups: dict[tuple[str, str, str, str, float], list[Cell]] = {}
    for c in plan:
        if c.arm in done:
            groups.setdefault((c.backbone, c.arm, c.task, c.mode, c.fraction), []).append(c)
    kept = [c for g in groups.values() if all(x.key in s.cells for x in g) for c in g]
    log(f"--cached-only: {len(kept)} of {len(plan)} planned cells kept; "
        f"{len(groups) - len({(c.backbone, c.arm, c.task, c.mode, c.fraction) for c in kept})} incomplete "
        "group(s) left out")
    return kept


def evaluate_all(s: Setup, plan: Sequence[Cell], encoders: dict[str, str | Path], device: str,
                 log: Callable[[str], None]) -> int:
    """Run every cell of ``plan`` not in the cache (each stored as soon as it is done); returns how many ran."""
    computed = 0
    for i, cell in enumerate(plan, 1):
        if cell.key in s.cells:
            continue
        summary = run_cell(s.profile, cell, encoders.get(f"{cell.backbone}|{cell.arm}"), s.run_dir, device)
        s.cells.put(cell.key, summary)
        computed += 1
        m = summary["metrics"][PRIMARY[cell.task]]
        log(f"cell {i}/{len(plan)} {cell.key}: {PRIMARY[cell.task]} {_fmt(m)} ({summary['wall_seconds']:.0f} s)")
    return computed


def write_outputs(s: Setup, args: argparse.Namespace, doc: dict[str, Any],
                  log: Callable[[str], None]) -> dict[str, Any]:
    """Export the shipped encoder (profiles of ``EXPORTING_PROFILES`` or ``--export-dir``), then write the JSON,
    the markdown table and the plots."""
    p = s.profile
    out_dir = Path(args.out_dir) if args.out_dir else (s.run_dir / "out" if p.name == "smoke" else RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "paper_table" if p.name == "cpu-small" else f"paper_table-{p.name}"
    doc["benchmark"] = stem
    export_dir = Path(args.export_dir) if args.export_dir else (
        SHIPPED_ENCODER if p.name in EXPORTING_PROFILES else None)
    if export_dir is not None and not args.no_export:
        try:
            doc["shipped_encoder"] = export_shipped_encoder(doc, s.run_dir, p.backbones[0], export_dir)
            log(f"shipped encoder: arm {doc['shipped_encoder']['arm']} -> {doc['shipped_encoder']['path']} "
                f"({doc['shipped_encoder']['size_mb']} MB)")
        except ExportElsewhere as exc:  # the table is still written: the cells are not lost for want of an export
            doc["shipped_encoder_not_exported"] = {"reason": str(exc), "best_arm": exc.arm, "scores": exc.scores}
            log(f"shipped encoder NOT exported: {exc}")
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(doc, indent=2, default=str, allow_nan=True) + "\n")
    (out_dir / f"{stem}.md").write_text(markdown_table(doc))
    doc["plots"] = [_display(path) for path in plot(doc, out_dir, stem)]
    json_path.write_text(json.dumps(doc, indent=2, default=str, allow_nan=True) + "\n")
    print(markdown_table(doc))
    log(f"wrote {_display(json_path)}, {stem}.md and {len(doc['plots'])} plot(s) in {_display(out_dir)}; "
        f"{doc['cells_computed_this_run']} cell(s) computed, {len(doc['cells']) - doc['cells_computed_this_run']} "
        f"from the cache; {doc['timings']['total_s'] / 60:.1f} min")
    return doc


def merge_results(s: Setup, paths: Sequence[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Cells of earlier results documents of this profile, added to the cell store where missing (never over a
    cell of this run folder); returns their pretraining records and where each came from.

    Why: ``cpu-12`` needs more CPU hours than one sitting, and run folders are not kept between machines;
    the results JSON (committed under docs/results) is what survives, so the table grows arm by arm.
    A document of another profile or fingerprint is refused: its cells were computed under other settings.
    """
    pre: dict[str, Any] = {}
    sources: list[dict[str, Any]] = []
    split = prepare_data(s.profile, s.data_dir, s.run_dir)["test_split"] if paths else {}
    for path in paths:
        doc = json.loads(Path(path).read_text())
        fp = doc.get("profile", {}).get("fingerprint")
        if fp != s.profile.fingerprint():
            raise SystemExit(f"--merge {path}: profile fingerprint {fp!r} is not this run's "
                             f"{s.profile.fingerprint()!r} ({s.profile.name}); its cells would mix settings")
        _check_same_split(path, doc, split)
        # Cells are keyed without their synthetic source: a document whose synthetic arms read another export
        # must not stand in for the synthetic arms this run computes (they would be skipped as done). Its other
        # synthetic arms join, and the table names their source apart (_merged_source_lines).
        tag = _source_tag(doc.get("run_dir", ""))
        clash = set(s.arms) & set(SYNTHETIC_ARMS) if tag != _source_tag(s.run_dir) else set()
        kept = {k: c for k, c in doc.get("cells", {}).items() if k.split("|")[1] not in clash}
        added = [k for k in kept if k not in s.cells]
        for key in added:
            s.cells.put(key, kept[key])
        for key, record in doc.get("pretraining", {}).items():
            if key.split("|")[1] not in clash:
                pre.setdefault(key, record)
        joined = sorted({k.split("|")[1] for k in kept} & set(SYNTHETIC_ARMS)) if tag != _source_tag(s.run_dir) else []
        sources.append({"file": str(path), "commit": doc.get("commit"), "date": doc.get("date"),
                        "synthetic_arms_from_another_source": joined,
                        "arms": doc.get("selection", {}).get("arms"), "synthetic": doc.get("synthetic"),
                        "provenance_note": doc.get("provenance_note"),
                        # what that document had merged in turn: the provenance of every part survives re-merging
                        "merged_from": doc.get("merged_from", []),
                        "cells_added": len(added), "synthetic_cells_left_out": len(doc.get("cells", {})) - len(kept)})
    return pre, sources


def _source_tag(run_dir: str | Path) -> str:
    """The synthetic source part of a run folder's name (``wds<identity>`` or ``gen<generator fingerprint>``)."""
    return Path(run_dir).name.rsplit("-", 1)[-1]


def _check_same_split(path: str, doc: dict[str, Any], split: dict[str, Any]) -> None:
    """``SystemExit`` unless ``doc`` was computed on this held-out split: the same fingerprint where it records
    one, else the same sizes (documents from before the fingerprint)."""
    theirs = doc.get("data", {}).get("test_split", {})
    if "fingerprint" in theirs:
        same = theirs["fingerprint"] == split["fingerprint"]
    else:
        same = {k: v for k, v in theirs.items() if k != "fingerprint"} == \
            {k: v for k, v in split.items() if k != "fingerprint"}
    if not same:
        raise SystemExit(f"--merge {path}: its held-out split differs from this run's ({theirs} vs {split}); "
                         "its cells were scored on other test images (recompute them here)")


def _union(first: Sequence[Any], second: Sequence[Any]) -> list[Any]:
    return list(first) + [x for x in second if x not in first]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Plan, probe, or run the table (resumable); returns the results document (the plan with --plan-only)."""
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    s = setup(args, argv)
    if args.probe:
        return probe(s.profile, s.data_dir, None if s.synthetic else s.generator, args.device, s.run_dir)
    merged_pre, merged = merge_results(s, args.merge)
    plan = show_plan(s, _log)
    if args.plan_only:
        return plan
    if args.cached_only:
        plan["plan"] = restrict_to_cached(s, plan["plan"], _log)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    data = prepare_data(s.profile, s.data_dir, s.run_dir)
    timings["data_s"] = time.perf_counter() - t_start
    encoders, pre, syn_info = pretrain_all(s, data, args.device, _log, timings)
    t = time.perf_counter()
    computed = evaluate_all(s, plan["plan"], encoders, args.device, _log)
    timings["evaluation_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_start
    selected = {c.key: s.cells.cells[c.key] for c in plan["plan"]}
    arms, tasks, modes, fractions = s.arms, s.tasks, s.modes, s.fractions
    for m in merged:  # the merged documents' cells join the table, and their arms its rows
        doc_cells = json.loads(Path(m["file"]).read_text())["cells"]
        selected.update({k: s.cells.cells[k] for k in doc_cells if k not in selected and k in s.cells})
        arms = _union(arms, [a for a in m["arms"] or [] if any(c["arm"] == a for c in selected.values())])
    for cell in selected.values():
        tasks, modes = _union(tasks, [cell["task"]]), _union(modes, [cell["mode"]])
        fractions = sorted(set(fractions) | {cell["label_fraction"]})
    pre = {**merged_pre, **pre}
    doc: dict[str, Any] = {
        "benchmark": "", "command": s.command, "commit": s.commit, "machine": machine(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "profile": {**json.loads(json.dumps(dataclasses.asdict(s.profile), default=list)),
                    "fingerprint": s.profile.fingerprint()},
        "selection": {"arms": arms, "tasks": tasks, "modes": modes, "fractions": fractions},
        "run_dir": str(s.run_dir), "data": data, "synthetic": syn_info, "pretraining": pre, "cells": selected,
        "merged_from": merged,
        "aggregated": aggregate_cells(selected), "seed_aggregation": SEED_CI_WORDS,
        "cells_computed_this_run": computed, "timings": {k: round(v, 1) for k, v in timings.items()},
        "compute_seconds": {"cells": round(sum(c["wall_seconds"] for c in selected.values()), 1),
                            "ssl": round(sum(p["wall_seconds"] for p in pre.values()), 1)},
        "eta_predicted": {k: round(v, 1) for k, v in plan["eta"].items()}, "rate_source": plan["rate_source"],
        "torch_threads": torch.get_num_threads(), "caveat": CAVEAT, "provenance_note": args.note or None,
    }
    return write_outputs(s, args, doc, _log)


if __name__ == "__main__":
    main()
