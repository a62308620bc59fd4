"""Patient-level train/test split of an image folder, written as symlinks (nothing is copied).

    .venv/bin/python scripts/split_folder.py SRC OUT [--test-fraction 0.2] [--max-images N] [--seed 0]

``SRC`` is an ImageFolder (``LABEL/*.png|jpg``, as ``kermany-pneumonia``) or a segmentation folder
(``images/`` + ``masks/``, as ``lung-seg``). ``OUT/train`` and ``OUT/test`` get the same layout, with no
patient (Kermany-style file names, ``models.data.folders.patient_id_from_name``) on both sides and the
labels stratified. ``--max-images N`` first keeps a seeded, label-stratified set of whole patients with
about N images, for a quick try. An earlier split in ``OUT`` (symlinks only) is replaced. This is how the
README makes the test folders of ``cxrsynth evaluate`` from ``../shared/data``, whose test split is withheld.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from models.data.folders import ImageRecord, list_image_folder, patient_split  # noqa: E402


def _records(src: Path) -> tuple[list[ImageRecord], bool]:
    """The images of ``src`` and whether it is a segmentation folder (images/ + masks/)."""
    if (src / "images").is_dir() and (src / "masks").is_dir():
        images = list_image_folder(src / "images")
        missing = [r.path.name for r in images if not (src / "masks" / r.path.name).is_file()]
        if missing:
            raise SystemExit(f"{src}/masks lacks the masks of {len(missing)} images, e.g. {missing[0]}")
        return images, True
    return list_image_folder(src), False


def _whole_patients(records: list[ImageRecord], n: int, seed: int) -> list[ImageRecord]:
    """About ``n`` of ``records`` in whole patients (seeded), each label keeping its share."""
    by_patient: dict[str, list[ImageRecord]] = {}
    for r in records:
        by_patient.setdefault(r.patient_id, []).append(r)
    order = sorted(by_patient)
    random.Random(seed).shuffle(order)
    quota = {label: round(n * count / len(records)) for label, count in Counter(r.label for r in records).items()}
    kept: list[ImageRecord] = []
    for patient in order:
        label = by_patient[patient][0].label
        if quota[label] > 0:
            kept.extend(by_patient[patient])
            quota[label] -= len(by_patient[patient])
    return sorted(kept, key=lambda r: str(r.path))


def _link(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.symlink_to(src.resolve())


def split_folder(src: Path, out: Path, test_fraction: float = 0.2, max_images: int | None = None,
                 seed: int = 0) -> dict[str, int]:
    """Write ``out/train`` and ``out/test`` as symlinks into ``src``; returns the image count of each side."""
    if out.is_symlink() or (out.exists() and any(p.is_file() and not p.is_symlink() for p in out.rglob("*"))):
        raise SystemExit(f"{out} holds files of its own: choose another folder")
    shutil.rmtree(out, ignore_errors=True)  # an earlier split (symlinks only) is replaced
    records, segmentation = _records(src)
    if max_images is not None and max_images < len(records):
        if max_images < 4:
            raise SystemExit("--max-images must be at least 4")
        records = _whole_patients(records, max_images, seed)
    train_idx, test_idx = patient_split(records, val_fraction=test_fraction, seed=seed)
    for side, idx in (("train", train_idx), ("test", test_idx)):
        for i in idx:
            path = records[i].path
            if segmentation:
                _link(path, out / side / "images" / path.name)
                _link(src / "masks" / path.name, out / side / "masks" / path.name)
            elif records[i].label is None:
                _link(path, out / side / path.name)
            else:
                _link(path, out / side / path.parent.name / path.name)
    return {"train": len(train_idx), "test": len(test_idx)}


def main(argv: list[str] | None = None) -> None:
    """Command line: split SRC into OUT/train and OUT/test and print what went where."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path, help="ImageFolder (LABEL/*.png|jpg) or images/ + masks/ folder")
    parser.add_argument("out", type=Path, help="where train/ and test/ are written (symlinks)")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="share of the patients in test/")
    parser.add_argument("--max-images", type=int, default=None, help="keep about this many images (whole patients)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 0.0 < args.test_fraction < 1.0:
        parser.error("--test-fraction must be in (0, 1)")
    try:
        sizes = split_folder(args.src, args.out, args.test_fraction, args.max_images, args.seed)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(str(exc)) from None
    test = args.out / "test"
    labels = Counter(p.parent.name for p in test.rglob("*") if p.is_symlink() and p.parent != test)
    kinds = "images + masks" if (test / "masks").is_dir() else ", ".join(f"{k} {v}" for k, v in sorted(labels.items()))
    print(f"{args.out}/train: {sizes['train']} images, {test}: {sizes['test']} images ({kinds}); "
          f"patient-level, seed {args.seed}")


if __name__ == "__main__":
    main()
