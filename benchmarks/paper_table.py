"""The paper table: does self-supervised pretraining on synthetic chest X-rays help as much as on real ones?

Arms (same backbone, same SSL method, steps, batch and seed for every pretrained arm):

* ``scratch``        random initialisation (no pretraining);
* ``real``           SSL on N real Kermany training images;
* ``synthetic``      SSL on N synthetic images from the shipped generator (same count as ``real``);
* ``synthetic-5x``   SSL on 5N synthetic images;
* ``real+synthetic`` SSL on the N real plus the N synthetic images.

Each arm is evaluated with the project's own evaluation code (``models.evaluation``), linear probe and
fine-tuning, at label fractions 1%, 10% and 100%, on pneumonia classification (AUC, F1, accuracy,
sensitivity, specificity) and lung segmentation (Dice, IoU, HD95), with bootstrap 95% CIs. Every cell
uses the same seed, epochs and validation split.

Data. The official Kermany test split is withheld from this project, so a test split is carved here:
all Kermany patients are split once, patient-level, stratified by label and seeded
(``models.data.folders.patient_split``); classification tests on images of the test patients, lung
segmentation on the lung-seg pairs of the same test patients (lung-seg images are Kermany images), and
nothing of a test patient is ever used for SSL, fine-tuning or model selection. Profiles subsample the
train and test sides (stratified, seeded) to fit their budget. Caveat, stated in every output: the
shipped generator was trained on all 5,016 Kermany training images, test patients included, so the
synthetic arms saw the test patients at one remove; the withheld official test split is the clean check.

Synthetic images are sampled once (guidance 2, DPM-Solver++ 20 steps, labels in the real class balance)
and cached outside the repository under ``--cache-dir`` keyed by generator fingerprint, count, seed and
sampler; the 1x set is the first images of each label of the 5x set. Everything else is resumable too:
SSL runs checkpoint, and every (backbone, arm, task, mode, fraction) cell is cached in ``cells.json`` of
the run folder, so a killed run continues where it stopped.

Profiles: ``smoke`` (tiny, seconds, used by a test), ``cpu-small`` (ResNet-18 at 64 px, sized for about
an hour on 2 idle cores) and ``gpu-full`` (ViT-S/16 and ResNet-50 at 224 px, all the data).

    python benchmarks/paper_table.py --profile cpu-small --plan-only     # sizes and ETA, runs nothing
    python benchmarks/paper_table.py --profile cpu-small --probe         # time each component, write probe JSON
    python benchmarks/paper_table.py --profile cpu-small                 # the run (resumable)

Outputs: a markdown table with CIs, the JSON (command, commit, machine), label-efficiency PNG plots, and
(``cpu-small`` by default) the best arm that used no real image in pretraining exported in fp16 to
``models/weights/encoder-synthetic-resnet18-64`` with its model card: the service serves it as a built-in
encoder.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import REPO_ROOT, RESULTS_DIR, commit, machine, write_result

ARMS = ("scratch", "real", "synthetic", "synthetic-5x", "real+synthetic")
NO_REAL_ARMS = ("synthetic", "synthetic-5x")  # arms whose pretraining saw no real image
TASKS = ("classification", "segmentation")
MODES = ("linear", "finetune")
PRIMARY = {"classification": "auc", "segmentation": "dice"}
DEFAULT_GENERATOR = REPO_ROOT / "models" / "weights" / "generator-kermany-64"
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cxrsynth" / "paper_table"
SHIPPED_ENCODER = REPO_ROOT / "models" / "weights" / "encoder-synthetic-resnet18-64"
CAVEAT = ("The shipped generator was trained on all 5,016 Kermany training images, including the patients of "
          "the test split carved here, so the synthetic arms saw the test patients at one remove; the withheld "
          "official Kermany test split is the clean evaluation.")


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
    # data: None = everything on that side of the patient-level test split
    test_patient_fraction: float = 0.2
    cls_train_images: int | None = None
    cls_test_images: int | None = None
    seg_train_pairs: int | None = None
    seg_test_pairs: int | None = None
    ssl_real_images: int | None = None
    synthetic_multiplier: int = 5
    # synthetic sampling
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
    seed: int = 0
    # seconds, used for the ETA until a probe of this profile exists (see --probe)
    assumed_rates: dict[str, float] = field(default_factory=dict)
    note: str = ""

    def fingerprint(self) -> str:
        """Hash of the fields that change results (the arms/fractions selected on the command line do not)."""
        d = dataclasses.asdict(self)
        for k in ("fractions", "assumed_rates", "note"):
            d.pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:10]


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
        assumed_rates={"sample_s_per_image": 0.1, "ssl_s_per_step": 0.5, "cell_overhead_s": 0.5,
                       "cls_train_img_s": 300.0, "seg_train_img_s": 150.0, "infer_img_s": 1000.0,
                       "decode_img_s": 500.0},
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
        # the probe of this machine (docs/results/paper_table_probe-cpu-small.json), rounded
        assumed_rates={"sample_s_per_image": 0.48, "ssl_s_per_step": 0.93, "cls_cell_overhead_s": 0.3,
                       "seg_cell_overhead_s": 1.7, "cls_train_img_s": 117.0, "seg_train_img_s": 81.0,
                       "infer_img_s": 460.0, "decode_img_s": 1800.0},
        note="ResNet-18 at 64 px on subsets, sized for about an hour on 2 idle CPU cores",
    ),
    "gpu-full": Profile(
        name="gpu-full", backbones=("vit_small_patch16_224", "resnet50"), resolution=224,
        ssl_steps=3000, ssl_batch=256, ssl_overrides={"warmup_steps": 300, "checkpoint_every": 250},
        cls_config={"epochs": 20, "batch_size": 64}, seg_config={"epochs": 40, "batch_size": 32},
        # guesses for one H200 (never measured: no GPU was lent to this work); run --probe on the GPU first
        assumed_rates={"sample_s_per_image": 0.005, "ssl_s_per_step": 0.08, "cell_overhead_s": 10.0,
                       "cls_train_img_s": 1500.0, "seg_train_img_s": 600.0, "infer_img_s": 5000.0,
                       "decode_img_s": 2000.0},
        note="the paper's backbones on all the data (one GPU); the shipped 64 px generator's images are "
             "upsampled to 224 px: pass --generator with a higher-resolution generator for a faithful run",
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
                       "lung_seg_test_side": len(seg_test_side)},
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
# Synthetic images: sampled once, cached by generator fingerprint + count + seed + sampler
# --------------------------------------------------------------------------------------------------
def generator_fingerprint(generator: Path) -> str:
    """SHA-256 (16 hex) of the files that decide what a generator samples."""
    h = hashlib.sha256()
    for name in ("cxrsynth.json", "config.json", "scheduler_config.json", "diffusion_pytorch_model.safetensors"):
        path = generator / name
        h.update(name.encode() + b"\0")
        h.update(path.read_bytes() if path.is_file() else b"")
    return h.hexdigest()[:16]


def synthetic_set(
    profile: Profile, generator: Path, counts: dict[str, int], cache_dir: Path, device: str,
    log: Callable[[str], None] = print, chunk: int = 64,
) -> tuple[np.ndarray, list[str], dict[str, Any]]:
    """``sum(counts)`` synthetic images ``(N, R, R)`` uint8 with their labels, from cache or sampled now.

    Sampled in chunks of ``chunk`` images (each saved when done, so a killed run keeps what it made);
    image ``i`` comes from seed ``(profile.seed, i)`` whatever the chunking."""
    from models.diffusion import CXRDiffusionPipeline, plan_generation

    total = sum(counts.values())
    key = (f"{generator.name}-{generator_fingerprint(generator)}-n{total}-seed{profile.seed}-"
           f"{profile.sampler}{profile.sampling_steps}-g{profile.guidance:g}")
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


def write_image_folder(images: np.ndarray, labels: Sequence[str], root: Path, prefix: str) -> Path:
    """PNGs ``root/<label>/<prefix>-<i>.png`` (idempotent: a complete folder is left as is)."""
    from PIL import Image

    marker = root / ".complete"
    if marker.is_file():
        return root
    for i, (img, lab) in enumerate(zip(images, labels, strict=True)):
        d = root / lab
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(img, dtype=np.uint8)).save(d / f"{prefix}-{i:06d}.png")
    marker.write_text("")
    return root


def ssl_folders(profile: Profile, run_dir: Path, data: dict[str, Any], generator: Path, cache_dir: Path,
                device: str, log: Callable[[str], None]) -> tuple[dict[str, Path], dict[str, Any]]:
    """The pretraining folder of every pretrained arm (synthetic images sampled or read from the cache)."""
    real_counts = {k.lower(): int(v) for k, v in data["ssl_real"]["counts"].items()}
    mult = profile.synthetic_multiplier
    images, labels, info = synthetic_set(profile, generator, {k: v * mult for k, v in real_counts.items()},
                                         cache_dir, device, log)
    # 1x: the first images of each label of the 5x set (exactly the real class counts)
    seen: Counter[str] = Counter()
    one_x = []
    for i, lab in enumerate(labels):
        if seen[lab] < real_counts.get(lab, 0):
            one_x.append(i)
            seen[lab] += 1
    base = run_dir / "data"
    syn1 = write_image_folder(images[one_x], [labels[i] for i in one_x], base / "ssl_synthetic", "syn")
    syn5 = write_image_folder(images, labels, base / f"ssl_synthetic_{mult}x", "syn")
    both = base / "ssl_real_synthetic"
    if not (both / ".complete").is_file():
        for src in (base / "ssl_real", syn1):
            for f in sorted(src.rglob("*")):
                if f.is_file() and not f.name.startswith("."):
                    _link(f, both / f.parent.name / f"{src.name}-{f.name}")
        (both / ".complete").write_text("")
    folders = {"real": base / "ssl_real", "synthetic": syn1, "synthetic-5x": syn5, "real+synthetic": both}
    info = {**info, "one_x": len(one_x), "five_x": len(labels)}
    return folders, info


# --------------------------------------------------------------------------------------------------
# Pretraining and cells
# --------------------------------------------------------------------------------------------------
def pretrain_config(profile: Profile, backbone: str) -> Any:
    from models.ssl import PretrainConfig

    overrides = dict(profile.ssl_overrides)
    overrides.setdefault("warmup_steps", min(PretrainConfig.warmup_steps, profile.ssl_steps // 10))
    overrides.setdefault("checkpoint_every", max(1, min(PretrainConfig.checkpoint_every, profile.ssl_steps)))
    return PretrainConfig(method=profile.ssl_method, backbone=backbone,  # type: ignore[arg-type]
                          backbone_kwargs=dict(profile.backbone_kwargs), resolution=profile.resolution,
                          max_steps=profile.ssl_steps, batch_size=profile.ssl_batch, seed=profile.seed, **overrides)


def pretrain_arm(profile: Profile, backbone: str, arm: str, folder: Path, run_dir: Path, device: str,
                 log: Callable[[str], None]) -> tuple[Path, dict[str, Any]]:
    """The arm's encoder folder (pretrained now, resumed from its checkpoint, or already there)."""
    from models.ssl import pretrain, read_encoder_config

    out = run_dir / "encoders" / backbone / arm.replace("+", "_")
    if (out / "config.json").is_file():
        pre = read_encoder_config(out)["pretraining"]
        return out, {"steps": pre["steps"], "wall_seconds": pre["wall_seconds"], "images": pre["data"]["num_images"],
                     "final_loss": pre.get("final_loss")}
    ckpt = run_dir / "checkpoints" / backbone / arm.replace("+", "_")
    resume = (ckpt / "checkpoint.pt").is_file()
    last = [0.0]

    def on_step(step: int, total: int, message: str) -> None:
        now = time.perf_counter()
        if now - last[0] > 30 or step == total:
            last[0] = now
            log(f"  [{arm}] step {step}/{total}: {message}")

    log(f"pretraining {arm} ({profile.ssl_method}, {backbone}, {profile.ssl_steps} steps)"
        + (" - resuming" if resume else ""))
    result = pretrain(folder, pretrain_config(profile, backbone), out, checkpoint_dir=ckpt, resume=resume,
                      on_step=on_step, device=device,
                      notes=f"Arm `{arm}` of benchmarks/paper_table.py (profile {profile.name}).")
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["pretraining"]["final_loss"] = result.final_loss
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    shutil.rmtree(ckpt, ignore_errors=True)
    return out, {"steps": result.steps, "wall_seconds": round(result.wall_seconds, 1),
                 "images": result.data.num_images, "final_loss": result.final_loss}


def cell_key(backbone: str, arm: str, task: str, mode: str, fraction: float) -> str:
    return f"{backbone}|{arm}|{task}|{mode}|{fraction:g}"


def run_cell(profile: Profile, backbone: str, arm: str, encoder: str | Path, task: str, mode: str, fraction: float,
             run_dir: Path, device: str, report_dir: Path | None = None) -> dict[str, Any]:
    """One evaluation with the profile's config; returns the cell summary (the full report is kept too, in
    ``report_dir``, default ``run_dir/reports``)."""
    from models.evaluation import (
        ClassificationConfig,
        SegmentationConfig,
        evaluate_classification,
        evaluate_segmentation,
    )

    data = run_dir / "data"
    scratch: dict[str, Any] = {"scratch_model": backbone, "scratch_kwargs": dict(profile.backbone_kwargs)}
    report_path = (report_dir or run_dir / "reports") / \
        f"{cell_key(backbone, arm, task, mode, fraction).replace('|', '__')}.json"
    if task == "classification":
        cfg = ClassificationConfig(resolution=profile.resolution, seed=profile.seed, **scratch, **profile.cls_config)
        report = evaluate_classification(encoder, data / "cls_train", data / "cls_test", mode=mode,  # type: ignore[arg-type]
                                         label_fraction=fraction, config=cfg, json_path=report_path, device=device)
    else:
        scfg = SegmentationConfig(resolution=profile.resolution, seed=profile.seed, **scratch, **profile.seg_config)
        report = evaluate_segmentation(encoder, data / "seg_train", data / "seg_test", mode=mode,  # type: ignore[arg-type]
                                       label_fraction=fraction, config=scfg, json_path=report_path, device=device)
    return {
        "backbone": backbone, "arm": arm, "task": task, "mode": mode, "label_fraction": fraction,
        "metrics": {k: {"value": v["value"], "low": v["low"], "high": v["high"]} for k, v in report["metrics"].items()},
        "train_images": report["split"]["train"], "val_images": report["split"]["val"],
        "test_images": report["split"]["test"], "selected": report["model_selection"]["chosen"],
        "wall_seconds": report["wall_seconds"], "report": report_path.name,
    }


class CellStore:
    """``cells.json`` of a run folder: one entry per finished cell, written atomically after each."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.cells: dict[str, dict[str, Any]] = json.loads(path.read_text()) if path.is_file() else {}

    def __contains__(self, key: str) -> bool:
        return key in self.cells

    def put(self, key: str, value: dict[str, Any]) -> None:
        self.cells[key] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.cells, indent=1, allow_nan=True) + "\n")
        tmp.replace(self.path)


# --------------------------------------------------------------------------------------------------
# Plan, ETA and probe
# --------------------------------------------------------------------------------------------------
def probe_path(profile: Profile) -> Path:
    return RESULTS_DIR / f"paper_table_probe-{profile.name}.json"


def rates_for(profile: Profile) -> tuple[dict[str, float], str]:
    """Component rates for the ETA: measured by ``--probe`` on this machine when available, else assumed."""
    path = probe_path(profile)
    if path.is_file():
        doc = json.loads(path.read_text())
        if doc.get("machine", {}).get("cpu") == machine().get("cpu") and doc.get("profile_fingerprint") == \
                profile.fingerprint():
            return {**profile.assumed_rates, **doc["rates"]}, f"measured ({path.relative_to(REPO_ROOT)})"
    return dict(profile.assumed_rates), "assumed (no probe of this profile on this machine: run --probe)"


def _cell_seconds(task: str, mode: str, fraction: float, epochs: int, sizes: dict[str, int],
                  rates: dict[str, float]) -> float:
    """Predicted seconds of one evaluation cell from the component rates (see :func:`probe`)."""
    n_pool, n_test = (sizes["cls_train"], sizes["cls_test"]) if task == "classification" else (
        sizes["seg_train"], sizes["seg_test"])
    n_val, n_train = 0.2 * n_pool, max(2.0, fraction * 0.8 * n_pool)
    overhead = rates.get("cls_cell_overhead_s" if task == "classification" else "seg_cell_overhead_s",
                         rates.get("cell_overhead_s", 0.0))
    t = overhead + (n_pool + n_test) / rates["decode_img_s"]
    if task == "classification" and mode == "linear":
        return t + (n_train + n_val + n_test) / rates["infer_img_s"]
    if task == "classification":
        train_rate, infer_rate = rates["cls_train_img_s"], rates["infer_img_s"]
    else:  # a U-Net forward pass costs about a third of its training step
        train_rate, infer_rate = rates["seg_train_img_s"], 3 * rates["seg_train_img_s"]
    if mode == "linear":  # frozen encoder: no encoder backward pass
        train_rate *= 1.5
    return t + epochs * n_train / train_rate + (epochs * n_val + n_test) / infer_rate


def estimate(profile: Profile, arms: Sequence[str], tasks: Sequence[str], modes: Sequence[str],
             fractions: Sequence[float], sizes: dict[str, int], rates: dict[str, float],
             have_synthetic: bool, cells_done: set[str]) -> dict[str, float]:
    """Seconds per phase (sampling, SSL, evaluation) of what is left to do."""
    sampling = 0.0 if have_synthetic else \
        sizes["ssl_real"] * profile.synthetic_multiplier * rates["sample_s_per_image"]
    pretrained = [a for a in arms if a != "scratch"]
    # the probe measures steps of batch 32; the cost of a step grows with its batch
    ssl = len(pretrained) * len(profile.backbones) * profile.ssl_steps * rates["ssl_s_per_step"] * (
        profile.ssl_batch / 32)
    epochs = {"classification": int(profile.cls_config.get("epochs", 10)),
              "segmentation": int(profile.seg_config.get("epochs", 20))}
    evaluation = sum(
        _cell_seconds(task, mode, f, epochs[task], sizes, rates)
        for backbone in profile.backbones for arm in arms for task in tasks for mode in modes for f in fractions
        if cell_key(backbone, arm, task, mode, f) not in cells_done)
    return {"sampling_s": sampling, "ssl_s": ssl, "evaluation_s": evaluation,
            "total_s": sampling + ssl + evaluation}


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
    """Wall s/image and threads of the reference sampling row in docs/results/sampling.json (idle machine)."""
    path = RESULTS_DIR / "sampling.json"
    if not path.is_file():
        return None
    doc = json.loads(path.read_text())
    sampler, steps, guidance = REFERENCE_SAMPLING
    for r in doc.get("rows", []):
        if r.get("pipeline") == "cxrsynth" and (r["sampler"], r["steps"], r["guidance"]) == (sampler, steps, guidance):
            return float(r["s_per_image"]), int(doc.get("torch_threads", 2))
    return None


def probe(profile: Profile, data_dir: Path, generator: Path, device: str, cache_dir: Path) -> dict[str, Any]:
    """Time each component of the profile on real data and write ``docs/results/paper_table_probe-<profile>.json``.

    This machine is shared, so wall times are not what an idle run will see. The probe therefore runs
    torch on ONE thread and measures the CPU seconds of each unit of work (sampling an image, an SSL step at
    batch 32, a supervised training image, an inference image, decoding an image, and two whole evaluation
    cells for the per-cell overhead); CPU seconds barely depend on the load. It converts them to idle
    wall time with one factor: the speed-up of the reference sampling row of ``docs/results/sampling.json``
    (measured on this machine, idle, 2 threads) over the same sampling here on one thread. That factor is
    an assumption for the other components (they parallelise differently), stated in the JSON."""
    import torch
    from torch import nn

    from models.data.folders import images_to_array, list_image_folder
    from models.diffusion import CXRDiffusionPipeline
    from models.evaluation import build_segmentation_model, resolve_encoder
    from models.ssl import finetune_augmentation, pretrain

    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)
    cpu: dict[str, float] = {}
    wall: dict[str, float] = {}
    load_before = os.getloadavg()

    records = list_image_folder(data_dir / "kermany-pneumonia")[::40][:96]
    x = np.zeros(0)

    def decode() -> None:
        nonlocal x
        x = images_to_array([r.path for r in records], profile.resolution, "pad", threads=2)

    w, c = _timed(decode)
    wall["decode_per_image"], cpu["decode_per_image"] = w / len(records), c / len(records)

    pipe = CXRDiffusionPipeline.from_pretrained(generator, device=device)
    n = 8 if pipe.device.type == "cpu" else 256
    labels = [pipe.label_names[i % len(pipe.label_names)] for i in range(n)]
    pipe(labels=labels[:2], num_inference_steps=2)  # warm-up
    sampler, steps, guidance = REFERENCE_SAMPLING
    w, c = _timed(lambda: pipe(labels=labels, seed=0, sampler=sampler, num_inference_steps=steps,
                               guidance_scale=guidance))
    wall["sample_per_image_reference"], cpu["sample_per_image_reference"] = w / n, c / n
    print(f"sampling ({sampler} {steps}, guidance {guidance:g}): {c / n:.3f} CPU s/image ({w / n:.3f} s wall)")

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
    batch = torch.rand(32, 1, profile.resolution, profile.resolution, device=dev)

    def train_cost(model: nn.Module, augment: nn.Module | None = None, reps: int = 3) -> tuple[float, float]:
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
        nn.Sequential(enc.fresh_copy(), nn.Linear(enc.num_features, 1)),
        finetune_augmentation(profile.resolution).to(dev))
    decoder = tuple(profile.seg_config.get("decoder_channels", (256, 128, 64, 32, 16)))
    wall["seg_train_per_image"], cpu["seg_train_per_image"] = train_cost(build_segmentation_model(enc, decoder))
    m = enc.module.to(dev).eval()
    with torch.inference_mode():
        m(batch)
        w, c = _timed(lambda: [m(batch).sum().item() for _ in range(3)])
    wall["infer_per_image"], cpu["infer_per_image"] = w / 96, c / 96
    print(f"classifier training {cpu['cls_train_per_image'] * 1000:.0f}, segmenter training "
          f"{cpu['seg_train_per_image'] * 1000:.0f}, inference {cpu['infer_per_image'] * 1000:.1f} CPU ms/image")

    # Whole cells (scratch, one epoch) on the profile's real split. The 10% cells give the per-cell overhead
    # beyond the per-image work above (decoding, validation, bootstrap, HD95, model building); the 100% cells
    # the effective cost of a training image inside the real loop (augmentation, batching, schedules).
    run_dir = cache_dir / "runs" / f"{profile.name}-{profile.fingerprint()}"
    data = prepare_data(profile, data_dir, run_dir)
    one_epoch = dataclasses.replace(profile, cls_config={**profile.cls_config, "epochs": 1},
                                    seg_config={**profile.seg_config, "epochs": 1})
    sizes = {"cls_train": data["cls_train"]["images"], "cls_test": data["cls_test"]["images"],
             "seg_train": data["seg_train"]["pairs"], "seg_test": data["seg_test"]["pairs"]}
    for task, mode, f in (("classification", "linear", 0.1), ("classification", "finetune", 1.0),
                          ("segmentation", "finetune", 0.1), ("segmentation", "finetune", 1.0)):
        w, c = _timed(lambda task=task, mode=mode, f=f: run_cell(  # type: ignore[misc]
            one_epoch, profile.backbones[0], "scratch", f"scratch:{profile.backbones[0]}", task, mode, f, run_dir,
            device, report_dir=run_dir / "probe-reports"))
        name = f"{task}_{mode}_{f:g}_cell"
        wall[name], cpu[name] = w, c
        print(f"{task} {mode} cell ({f:.0%} labels, 1 epoch): {c:.1f} CPU s")
    base = {**_idle_rates(cpu, 1.0, profile), "cls_cell_overhead_s": 0.0, "seg_cell_overhead_s": 0.0}
    cpu["cls_cell_overhead"] = max(0.0, cpu["classification_linear_0.1_cell"]
                                   - _cell_seconds("classification", "linear", 0.1, 1, sizes, base))
    cpu["seg_cell_overhead"] = max(0.0, cpu["segmentation_finetune_0.1_cell"]
                                   - _cell_seconds("segmentation", "finetune", 0.1, 1, sizes, base))
    for task, key, pool in (("classification", "cls", "cls_train"), ("segmentation", "seg", "seg_train")):
        with_overhead = {**base, f"{key}_cell_overhead_s": cpu[f"{key}_cell_overhead"]}
        # the predicted cell minus its training part, then the rest of the measured cell spread over the images
        rest = _cell_seconds(task, "finetune", 1.0, 1, sizes, with_overhead) - \
            0.8 * sizes[pool] * cpu[f"{key}_train_per_image"]
        effective = (cpu[f"{task}_finetune_1_cell"] - rest) / (0.8 * sizes[pool])
        cpu[f"{key}_train_per_image_microbenchmark"] = cpu[f"{key}_train_per_image"]
        cpu[f"{key}_train_per_image"] = max(cpu[f"{key}_train_per_image"], effective)
    print(f"per-cell overhead: classification {cpu['cls_cell_overhead']:.1f}, segmentation "
          f"{cpu['seg_cell_overhead']:.1f} CPU s; training in the loop: classification "
          f"{cpu['cls_train_per_image'] * 1000:.0f}, segmentation {cpu['seg_train_per_image'] * 1000:.0f} CPU ms/image")

    ref = _reference_s_per_image()
    if ref is not None and pipe.device.type == "cpu":
        speedup = cpu["sample_per_image_reference"] / ref[0]
        calibration = {"reference": f"docs/results/sampling.json {sampler} {steps} steps guidance {guidance:g}: "
                                    f"{ref[0]:.3f} s/image wall on {ref[1]} threads, idle machine",
                       "speedup_over_one_thread_cpu_seconds": round(speedup, 3)}
    else:
        speedup = 1.0
        calibration = {"reference": "none (no sampling.json row or not a CPU run): wall = CPU seconds of one thread"}
    rates = _idle_rates(cpu, speedup, profile)
    torch.set_num_threads(threads_before)
    write_result(f"paper_table_probe-{profile.name}", {
        "profile": profile.name, "profile_fingerprint": profile.fingerprint(), "device": str(dev),
        "torch_threads_measured": 1, "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "cpu_seconds_one_thread": cpu, "wall_seconds_under_this_load": wall, "calibration": calibration,
        "rates": rates,
        "notes": "rates = predicted wall time on an idle machine: CPU seconds of one thread divided by the "
                 "calibration speed-up (an assumption for components other than sampling). SSL per step at "
                 "batch 32 (mean of steps 2-4). Training cost per image: the larger of a microbenchmark "
                 "(forward+backward+AdamW on random 32-image batches) and what a whole one-epoch 100% cell "
                 "implies; per-cell overheads from one-epoch 10% cells.",
    }, probe_path(profile))
    print(f"idle-machine estimate: {json.dumps({k: round(v, 4) for k, v in rates.items()})}")
    return rates


def _idle_rates(cpu: dict[str, float], speedup: float, profile: Profile) -> dict[str, float]:
    """The ETA's rates from one-thread CPU seconds and a speed-up factor."""
    step_ratio = profile.sampling_steps / REFERENCE_SAMPLING[1]
    return {
        "sample_s_per_image": cpu["sample_per_image_reference"] * step_ratio / speedup,
        "ssl_s_per_step": cpu["ssl_per_step_b32"] / speedup,
        "cls_train_img_s": speedup / cpu["cls_train_per_image"],
        "seg_train_img_s": speedup / cpu["seg_train_per_image"],
        "infer_img_s": speedup / cpu["infer_per_image"],
        "decode_img_s": 1.0 / cpu["decode_per_image"],  # PIL decoding runs in its own 2 threads already
        "cls_cell_overhead_s": cpu.get("cls_cell_overhead", 0.0) / speedup,
        "seg_cell_overhead_s": cpu.get("seg_cell_overhead", 0.0) / speedup,
    }


# --------------------------------------------------------------------------------------------------
# Outputs: table, plots, shipped encoder
# --------------------------------------------------------------------------------------------------
def _fmt(m: dict[str, float] | None, digits: int = 3) -> str:
    if m is None:
        return "—"
    if m["value"] != m["value"]:
        return "n/a"
    return f"{m['value']:.{digits}f} [{m['low']:.{digits}f}, {m['high']:.{digits}f}]"


def markdown_table(doc: dict[str, Any]) -> str:
    """The results as Markdown: one table per backbone and task, arms x modes by label fraction."""
    cells: dict[str, dict[str, Any]] = doc["cells"]
    fractions = doc["selection"]["fractions"]
    lines = [f"# Paper table: SSL on synthetic vs real chest X-rays ({doc['profile']['name']})", "",
             f"- command: `{doc['command']}`", f"- commit: `{doc['commit']}`",
             f"- machine: {doc['machine'].get('cpu')}, {doc['machine'].get('cpu_count')} cores, "
             f"GPU {doc['machine'].get('gpu') or 'none'}, torch {doc['machine'].get('torch')}",
             f"- date: {doc['date']}; this invocation {doc['timings']['total_s'] / 60:.1f} min; compute of all "
             f"cells {doc['compute_seconds']['cells'] / 60:.1f} min + SSL {doc['compute_seconds']['ssl'] / 60:.1f} min "
             "(cached parts included)", f"- profile: {doc['profile']['note']}", ""]
    d = doc["data"]
    lines += ["## Data", "",
              f"Kermany split once, patient-level ({d['test_split']['test_patients']} test patients, seed "
              f"{d['test_split']['seed']}); lung segmentation uses the lung-seg pairs of the same patients.", "",
              "| set | size | labels |", "|---|---|---|"]
    for name in ("cls_train", "cls_test", "seg_train", "seg_test", "ssl_real"):
        size = d[name].get("images", d[name].get("pairs"))
        lines.append(f"| {name} | {size} | {', '.join(f'{k}: {v}' for k, v in d[name]['counts'].items())} |")
    syn = doc["synthetic"]
    lines += ["", f"Synthetic: {syn['one_x']} (1x) and {syn['five_x']} ({doc['profile']['synthetic_multiplier']}x) "
              f"images from `{syn['generator']}` ({syn['sampler']} {syn['steps']} steps, guidance {syn['guidance']:g}, "
              f"seed {syn['seed']}, labels in the real class balance).", "",
              f"SSL: {doc['profile']['ssl_method']}, {doc['profile']['ssl_steps']} steps of batch "
              f"{doc['profile']['ssl_batch']} for every pretrained arm (seed {doc['profile']['seed']}).", "",
              f"> {CAVEAT}", ""]
    for backbone in doc["profile"]["backbones"]:
        for task in doc["selection"]["tasks"]:
            metric = PRIMARY[task]
            lines += [f"## {task}, {backbone}: test {metric.upper()} [95% CI]", "",
                      "| arm | mode | " + " | ".join(f"{f:.0%} labels" for f in fractions) + " |",
                      "|---|---|" + "---|" * len(fractions)]
            for arm in doc["selection"]["arms"]:
                for mode in doc["selection"]["modes"]:
                    row = [(cells.get(cell_key(backbone, arm, task, mode, f)) or {}).get("metrics", {}).get(metric)
                           for f in fractions]
                    lines.append(f"| {arm} | {mode} | " + " | ".join(_fmt(m) for m in row) + " |")
            lines.append("")
    pre = doc["pretraining"]
    lines += ["## Pretraining runs", "", "| backbone | arm | images | steps | final loss | wall s |",
              "|---|---|---|---|---|---|"]
    for key, p in pre.items():
        backbone, arm = key.split("|")
        loss = p.get("final_loss")
        lines.append(f"| {backbone} | {arm} | {p['images']} | {p['steps']} | "
                     f"{'' if loss is None else f'{loss:.4f}'} | {p['wall_seconds']} |")
    if doc.get("shipped_encoder"):
        s = doc["shipped_encoder"]
        lines += ["", f"Shipped encoder: arm `{s['arm']}` (best mean primary metric of the arms without real "
                      f"images in pretraining: {s['score']:.4f}) exported fp16 to `{s['path']}`."]
    lines += ["", "Secondary metrics (F1, accuracy, sensitivity, specificity, IoU, HD95), selected epochs / C and "
              "split sizes are in the JSON beside this file.", ""]
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
            metric = PRIMARY[task]
            for c, mode in enumerate(modes):
                ax = axes[r][c]
                for k, arm in enumerate(arms):
                    pts = [(f, doc["cells"].get(cell_key(backbone, arm, task, mode, f), {}).get("metrics", {})
                            .get(metric)) for f in fractions]
                    pts = [(f, m) for f, m in pts if m is not None and m["value"] == m["value"]]
                    if not pts:
                        continue
                    xs = np.array([f for f, _ in pts]) * (1 + 0.04 * (k - len(arms) / 2))  # dodge overlaps
                    ys = np.array([m["value"] for _, m in pts])
                    err = np.array([[m["value"] - m["low"] for _, m in pts], [m["high"] - m["value"] for _, m in pts]])
                    ax.errorbar(xs, ys, yerr=np.clip(err, 0, None), marker="o", capsize=3, label=arm)
                ax.set_xscale("log")
                ax.set_xticks(fractions, [f"{f:.0%}" for f in fractions])
                ax.set_xlabel("labelled share of the training split")
                ax.set_ylabel(f"test {metric.upper()}")
                ax.set_title(f"{task}, {mode}")
                ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.suptitle(f"Label efficiency, {backbone} {doc['profile']['resolution']} px ({doc['profile']['name']}; "
                     "bars: 95% bootstrap CI)")
        fig.tight_layout()
        path = out_dir / f"{stem}-{backbone}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def arm_score(cells: dict[str, dict[str, Any]], backbone: str, arm: str) -> float:
    """Mean primary metric (AUC, Dice) over the arm's cells: how the shipped encoder is chosen."""
    vals = [c["metrics"][PRIMARY[c["task"]]]["value"] for c in cells.values()
            if c["backbone"] == backbone and c["arm"] == arm]
    vals = [v for v in vals if v == v]
    return float(np.mean(vals)) if vals else float("nan")


def export_shipped_encoder(doc: dict[str, Any], run_dir: Path, backbone: str, export_dir: Path) -> dict[str, Any]:
    """Export the best arm without real images in pretraining (fp16, model card with its results) to
    ``export_dir``; ``config.json`` carries the results as ``metrics`` (shown by ``GET /v1/encoders``)."""
    from models.ssl import export_encoder, load_encoder, read_encoder_config

    scores = {arm: arm_score(doc["cells"], backbone, arm) for arm in NO_REAL_ARMS if arm in doc["selection"]["arms"]}
    scores = {a: s for a, s in scores.items() if s == s}
    if not scores:
        raise SystemExit("no arm without real images was evaluated: nothing to export")
    best = max(scores, key=lambda a: (scores[a], -NO_REAL_ARMS.index(a)))
    src = run_dir / "encoders" / backbone / best.replace("+", "_")
    cfg = read_encoder_config(src)
    arm_cells = {k: c for k, c in doc["cells"].items() if c["backbone"] == backbone and c["arm"] == best}
    rows = ["| task | mode | labels | metric | test value [95% CI] |", "|---|---|---|---|---|"]
    for c in sorted(arm_cells.values(), key=lambda c: (c["task"], c["mode"], c["label_fraction"])):
        metric = PRIMARY[c["task"]]
        rows.append(f"| {c['task']} | {c['mode']} | {c['label_fraction']:.0%} | {metric} | "
                    f"{_fmt(c['metrics'][metric])} |")
    syn = doc["synthetic"]
    notes = "\n".join([
        f"Pretrained on synthetic images only: {cfg['pretraining']['data']['num_images']:,} images sampled from "
        f"the shipped generator `{syn['generator']}` ({syn['sampler']} {syn['steps']} steps, guidance "
        f"{syn['guidance']:g}); no real image was used in pretraining. Chosen as arm `{best}` of "
        f"`benchmarks/paper_table.py` (profile {doc['profile']['name']}), the best of {sorted(scores)} by mean test "
        "AUC / Dice over its cells.", "",
        f"Evaluated with `models.evaluation` on a patient-level test split of Kermany / lung-seg "
        f"({doc['data']['cls_test']['images']} test images, {doc['data']['seg_test']['pairs']} test pairs):", "",
        *rows, "",
        f"Command `{doc['command']}`, commit `{doc['commit']}`, {doc['machine'].get('cpu')}. {CAVEAT}",
    ])
    out = export_encoder(export_dir, load_encoder(src), model_name=cfg["architecture"], timm_kwargs=cfg["timm_kwargs"],
                         resolution=cfg["resolution"], mean=cfg["mean"][0], std=cfg["std"][0], method=cfg["method"],
                         pretraining=cfg["pretraining"], aspect_mode=cfg["aspect_mode"], fp16=True, notes=notes)
    exported = json.loads((out / "config.json").read_text())
    exported["metrics"] = {
        "source": f"benchmarks/paper_table.py --profile {doc['profile']['name']} (commit {doc['commit']})",
        "arm": best,
        "cells": {f"{c['task']}/{c['mode']}/{c['label_fraction']:g}": c["metrics"] for c in arm_cells.values()},
    }
    (out / "config.json").write_text(json.dumps(exported, indent=2) + "\n")
    size_mb = (out / "model.safetensors").stat().st_size / 2**20
    return {"arm": best, "score": scores[best], "scores": scores, "path": _display(out), "size_mb": round(size_mb, 1)}


def _display(path: Path) -> str:
    p = path.resolve()
    return str(p.relative_to(REPO_ROOT)) if p.is_relative_to(REPO_ROOT) else str(p)


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------
def _csv(text: str | None, allowed: Sequence[str], what: str) -> list[str]:
    if not text:
        return list(allowed)
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad:
        raise SystemExit(f"unknown {what}: {bad}; choose from {list(allowed)}")
    return [a for a in allowed if a in items]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=sorted(PROFILES), default="cpu-small")
    ap.add_argument("--data-dir", default=None, help="real data (default: $CXR_DATA_DIR or ../shared/data)")
    ap.add_argument("--generator", default=str(DEFAULT_GENERATOR))
    ap.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="synthetic images and run folders (not the repo)")
    ap.add_argument("--out-dir", default=None, help="table, JSON and plots (default: docs/results for cpu-small "
                                                      "and gpu-full, the run folder for smoke)")
    ap.add_argument("--export-dir", default=None, help="where the shipped encoder goes (default: "
                                                         "models/weights/encoder-synthetic-resnet18-64 for cpu-small)")
    ap.add_argument("--no-export", action="store_true", help="do not export the shipped encoder")
    ap.add_argument("--arms", default=None, help=f"comma-separated subset of {','.join(ARMS)}")
    ap.add_argument("--tasks", default=None, help="classification,segmentation")
    ap.add_argument("--modes", default=None, help="linear,finetune")
    ap.add_argument("--fractions", default=None, help="label fractions, e.g. 0.01,0.1,1")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    ap.add_argument("--plan-only", action="store_true", help="print the plan and ETA, run nothing")
    ap.add_argument("--probe", action="store_true", help="time each component, write the probe JSON, stop")
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    profile = PROFILES[args.profile]
    from models.diffusion.testing import shared_data_dir

    data_dir = Path(args.data_dir) if args.data_dir else shared_data_dir()
    generator = Path(args.generator)
    if args.probe:
        probe(profile, data_dir, generator, args.device, Path(args.cache_dir).expanduser())
        return {}
    arms = _csv(args.arms, ARMS, "arms")
    tasks = _csv(args.tasks, TASKS, "tasks")
    modes = _csv(args.modes, MODES, "modes")
    fractions = sorted({float(f) for f in args.fractions.split(",")}) if args.fractions else list(profile.fractions)
    if any(not 0 < f <= 1 for f in fractions):
        raise SystemExit("fractions must be in (0, 1]")
    cache_dir = Path(args.cache_dir).expanduser()
    run_dir = cache_dir / "runs" / f"{profile.name}-{profile.fingerprint()}"
    run_dir.mkdir(parents=True, exist_ok=True)
    cells = CellStore(run_dir / "cells.json")

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    # ---- plan
    rates, rate_source = rates_for(profile)
    sizes = planned_sizes(profile)
    splits = run_dir / "data" / "splits.json"
    if splits.is_file():  # the data is prepared already: its exact sizes
        d = json.loads(splits.read_text())
        sizes = {k: int(d[k].get("images", d[k].get("pairs", 0))) for k in sizes}
    syn_total = sizes["ssl_real"] * profile.synthetic_multiplier
    have_syn = any((cache_dir / "synthetic").glob(f"{generator.name}-*-n{syn_total}-seed{profile.seed}-"
                                                  f"{profile.sampler}{profile.sampling_steps}-g{profile.guidance:g}/images.npz"))
    eta = estimate(profile, arms, tasks, modes, fractions, sizes, rates, have_syn, set(cells.cells))
    n_cells = len(profile.backbones) * len(arms) * len(tasks) * len(modes) * len(fractions)
    log(f"profile {profile.name} ({profile.note}); run folder {run_dir}")
    log(f"  backbones {', '.join(profile.backbones)} at {profile.resolution} px; arms {', '.join(arms)}; "
        f"tasks {', '.join(tasks)}; modes {', '.join(modes)}; fractions {', '.join(f'{f:g}' for f in fractions)}")
    log(f"  data: cls train {sizes['cls_train']} / test {sizes['cls_test']}, seg train {sizes['seg_train']} / test "
        f"{sizes['seg_test']}, SSL real {sizes['ssl_real']}, synthetic {sizes['ssl_real']} and {syn_total}"
        f"{' (cached)' if have_syn else ''}")
    todo = [(b, a, tk, m, f) for b in profile.backbones for a in arms for tk in tasks for m in modes for f in fractions]
    cached = sum(cell_key(*c) in cells for c in todo)
    log(f"  SSL {profile.ssl_method} {profile.ssl_steps} steps x batch {profile.ssl_batch}; cells {n_cells} "
        f"({cached} cached)")
    log(f"  ETA {eta['total_s'] / 60:.1f} min = sampling {eta['sampling_s'] / 60:.1f} + SSL {eta['ssl_s'] / 60:.1f} "
        f"+ evaluation {eta['evaluation_s'] / 60:.1f}; rates {rate_source}")
    if args.plan_only:
        return {"eta": eta, "rates": rates, "rate_source": rate_source, "sizes": sizes, "cells": n_cells}

    # ---- run
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    t = time.perf_counter()
    data = prepare_data(profile, data_dir, run_dir)
    timings["data_s"] = time.perf_counter() - t
    t = time.perf_counter()
    folders, syn_info = ssl_folders(profile, run_dir, data, generator, cache_dir, args.device, log)
    timings["synthetic_s"] = time.perf_counter() - t
    t = time.perf_counter()
    encoders: dict[str, str | Path] = {}
    pre: dict[str, Any] = {}
    for backbone in profile.backbones:
        for arm in arms:
            if arm == "scratch":
                encoders[f"{backbone}|{arm}"] = f"scratch:{backbone}"
                continue
            path, info = pretrain_arm(profile, backbone, arm, folders[arm], run_dir, args.device, log)
            encoders[f"{backbone}|{arm}"] = path
            pre[f"{backbone}|{arm}"] = info
    timings["ssl_s"] = time.perf_counter() - t
    t = time.perf_counter()
    computed = 0
    for i, (backbone, arm, task, mode, f) in enumerate(todo, 1):
        key = cell_key(backbone, arm, task, mode, f)
        if key in cells:
            continue
        summary = run_cell(profile, backbone, arm, encoders[f"{backbone}|{arm}"], task, mode, f, run_dir, args.device)
        cells.put(key, summary)
        computed += 1
        m = summary["metrics"][PRIMARY[task]]
        log(f"cell {i}/{len(todo)} {key}: {PRIMARY[task]} {_fmt(m)} ({summary['wall_seconds']:.0f} s)")
    timings["evaluation_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_start

    selected = {cell_key(*c): cells.cells[cell_key(*c)] for c in todo}
    out_dir = Path(args.out_dir) if args.out_dir else (run_dir / "out" if profile.name == "smoke" else RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "paper_table" if profile.name == "cpu-small" else f"paper_table-{profile.name}"
    doc: dict[str, Any] = {
        "benchmark": stem,
        "command": " ".join(["python benchmarks/paper_table.py", *(argv if argv is not None else sys.argv[1:])]),
        "commit": commit(), "machine": machine(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "profile": {**json.loads(json.dumps(dataclasses.asdict(profile), default=list)),
                    "fingerprint": profile.fingerprint()},
        "selection": {"arms": arms, "tasks": tasks, "modes": modes, "fractions": fractions},
        "data": data, "synthetic": syn_info, "pretraining": pre, "cells": selected,
        "cells_computed_this_run": computed, "timings": {k: round(v, 1) for k, v in timings.items()},
        "compute_seconds": {"cells": round(sum(c["wall_seconds"] for c in selected.values()), 1),
                            "ssl": round(sum(p["wall_seconds"] for p in pre.values()), 1)},
        "eta_predicted": {k: round(v, 1) for k, v in eta.items()}, "rate_source": rate_source,
        "torch_threads": torch.get_num_threads(), "caveat": CAVEAT,
    }
    default_export = SHIPPED_ENCODER if profile.name == "cpu-small" else None
    export_dir = Path(args.export_dir) if args.export_dir else default_export
    if export_dir is not None and not args.no_export:
        doc["shipped_encoder"] = export_shipped_encoder(doc, run_dir, profile.backbones[0], export_dir)
        log(f"shipped encoder: arm {doc['shipped_encoder']['arm']} -> {doc['shipped_encoder']['path']} "
            f"({doc['shipped_encoder']['size_mb']} MB)")
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(doc, indent=2, default=str, allow_nan=True) + "\n")
    (out_dir / f"{stem}.md").write_text(markdown_table(doc))
    doc["plots"] = [_display(p) for p in plot(doc, out_dir, stem)]
    json_path.write_text(json.dumps(doc, indent=2, default=str, allow_nan=True) + "\n")
    print(markdown_table(doc))
    log(f"wrote {_display(json_path)}, {stem}.md and {len(doc['plots'])} plot(s) in {_display(out_dir)}; "
        f"{computed} cell(s) computed, {len(todo) - computed} from the cache; {timings['total_s'] / 60:.1f} min")
    return doc


if __name__ == "__main__":
    main()
