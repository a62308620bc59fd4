"""Image-folder reading, resizing with explicit aspect handling, and patient-level splits.

Layouts accepted everywhere a "data folder" is asked for:

* ImageFolder: ``ROOT/<label>/*.png|jpg|jpeg`` (as ``kermany-pneumonia``); the label is the folder
  name, lower-cased.
* Unlabelled: images directly in ``ROOT`` (label ``None``), for unconditional generators.

Hidden entries (``.ipynb_checkpoints``, ``.DS_Store``) are skipped, as uploads skip them, and so are
the report figures in ``SIDECAR_IMAGES``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
# Figures cxrsynth itself writes beside the label folders of a generated dataset (``cxrsynth generate``):
# never samples, so every reader skips them and our outputs feed our own commands.
SIDECAR_IMAGES = frozenset({"privacy_report.png"})
AspectMode = Literal["pad", "center-crop", "squash"]


@dataclass(frozen=True)
class ImageRecord:
    """One image on disk with its label (``None`` when unlabelled) and the patient it belongs to."""

    path: Path
    label: str | None
    patient_id: str


_PERSON = re.compile(r"^(person\d+)_", re.IGNORECASE)
_TRAILING_NUMBER = re.compile(r"[-_ ]*\d+$")


def patient_id_from_name(filename: str) -> str:
    """Patient key of a Kermany-style file name: the part before the last number.

    ``person12_bacteria_3.jpeg`` -> ``person12`` (a patient can have bacteria and virus images);
    ``IM-0117-0001.jpeg`` -> ``IM-0117``; ``NORMAL2-IM-1234-0001.jpeg`` -> ``NORMAL2-IM-1234``.
    A name without a trailing number is its own patient.
    """
    stem = Path(filename).stem
    m = _PERSON.match(stem)
    if m:
        return m.group(1).lower()
    stripped = _TRAILING_NUMBER.sub("", stem)
    return stripped or stem


def list_image_folder(root: str | Path) -> list[ImageRecord]:
    """List the images of an ImageFolder or unlabelled folder, sorted for reproducibility.

    Raises ``FileNotFoundError`` for a missing folder and ``ValueError`` for a folder with no images.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root}")
    records: list[ImageRecord] = []
    for p in sorted(root.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_dir():
            for f in sorted(p.iterdir()):
                if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in IMAGE_SUFFIXES:
                    records.append(ImageRecord(f, p.name.lower(), patient_id_from_name(f.name)))
        elif p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and p.name not in SIDECAR_IMAGES:
            records.append(ImageRecord(p, None, patient_id_from_name(p.name)))
    if not records:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in {root}")
    labelled = {r.label is not None for r in records}
    if len(labelled) > 1:
        raise ValueError(f"{root} mixes images in label folders with loose images; use one layout")
    return records


def resize_grey(img: Image.Image, size: int, mode: AspectMode = "pad") -> Image.Image:
    """Resize a greyscale image to ``size x size`` with the aspect ratio handled explicitly.

    ``pad`` keeps every pixel of anatomy and adds black borders on the short side (the default: a
    crop could cut the costophrenic angles, a squash distorts the heart shadow); ``center-crop``
    crops the long side; ``squash`` ignores the aspect ratio (Kermany images are already square).
    """
    w, h = img.size
    if mode == "squash" or w == h:
        return img.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=3.0)
    if mode == "center-crop":
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        return img.crop((left, top, left + s, top + s)).resize(
            (size, size), Image.Resampling.BICUBIC, reducing_gap=3.0
        )
    scale = size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    canvas = Image.new("L", (size, size), 0)
    canvas.paste(img.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0), ((size - nw) // 2, (size - nh) // 2))
    return canvas


def load_grey(path: str | Path, size: int | None = None, mode: AspectMode = "pad") -> np.ndarray:
    """Read an image as 8-bit grey (H, W) uint8, optionally resized to ``size x size``.

    Raises ``ValueError`` naming the file when it is not a readable image.
    """
    try:
        with Image.open(path) as im:
            im.load()
            grey = im.convert("L")
    except Exception as exc:  # PIL raises several types for corrupt files
        raise ValueError(f"not a readable image: {path} ({exc})") from exc
    if size is not None:
        grey = resize_grey(grey, size, mode)
    return np.asarray(grey, dtype=np.uint8)


def images_to_array(
    paths: Sequence[str | Path], size: int, mode: AspectMode = "pad", threads: int = 4
) -> np.ndarray:
    """Load many images into one (N, size, size) uint8 array (decoding in a small thread pool)."""
    out = np.empty((len(paths), size, size), dtype=np.uint8)

    def _load(i: int) -> None:
        out[i] = load_grey(paths[i], size, mode)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(_load, range(len(paths))))
    return out


def patient_split(
    records: Sequence[ImageRecord], val_fraction: float = 0.2, seed: int = 0
) -> tuple[list[int], list[int]]:
    """Seeded, label-stratified split that keeps every patient on one side: (train idx, val idx).

    Uses scikit-learn's ``StratifiedGroupKFold`` (groups = patients) and takes one fold as validation.
    """
    from sklearn.model_selection import GroupShuffleSplit, StratifiedGroupKFold

    if not 0.0 < val_fraction < 1.0:
        raise ValueError("val_fraction must be in (0, 1)")
    n_splits = max(2, round(1.0 / val_fraction))
    groups = [r.patient_id for r in records]
    labels = [r.label or "" for r in records]
    idx = np.arange(len(records))
    if len(set(labels)) > 1:
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        train_idx, val_idx = next(splitter.split(idx, labels, groups))
    else:
        gss = GroupShuffleSplit(n_splits=1, test_size=val_fraction, random_state=seed)
        train_idx, val_idx = next(gss.split(idx, labels, groups))
    return sorted(int(i) for i in train_idx), sorted(int(i) for i in val_idx)


def load_pneumoniamnist(path: str | Path, split: Literal["train", "val"] = "train") -> tuple[np.ndarray, np.ndarray]:
    """PneumoniaMNIST arrays: images (N, 28, 28) uint8 and labels (N,) int64 (1 = pneumonia)."""
    with np.load(path) as z:
        images = np.asarray(z[f"{split}_images"], dtype=np.uint8)
        labels = np.asarray(z[f"{split}_labels"]).reshape(-1).astype(np.int64)
    return images, labels


def write_image_folder(
    images: np.ndarray, labels: Sequence[int] | np.ndarray, root: str | Path, label_names: Sequence[str]
) -> Path:
    """Write (N, H, W) uint8 images as PNGs into an ImageFolder ``root/<label_name>/NNNNN.png``."""
    root = Path(root)
    for i, (img, lab) in enumerate(zip(images, labels, strict=True)):
        d = root / label_names[int(lab)]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(img, dtype=np.uint8), mode="L").save(d / f"img{i:05d}-0001.png")
    return root


def folder_image_sizes(root: str | Path) -> dict[str, int]:
    """Images per ``"WxH"`` size in a data folder (headers only, nothing decoded), most common first."""
    from collections import Counter

    counts: Counter[str] = Counter()
    for rec in list_image_folder(root):
        with Image.open(rec.path) as im:
            counts[f"{im.size[0]}x{im.size[1]}"] += 1
    return dict(counts.most_common())
