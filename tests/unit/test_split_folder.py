"""``scripts/split_folder.py`` (the README's train / test folders): patient-level, both layouts, symlinks only."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.data.folders import list_image_folder, patient_id_from_name
from scripts.split_folder import split_folder


def _patients(folder: Path) -> set[str]:
    return {patient_id_from_name(p.name) for p in folder.rglob("*") if p.is_symlink()}


def test_imagefolder_split_keeps_patients_apart(shared_data: Path, tmp_path: Path) -> None:
    sizes = split_folder(shared_data / "kermany-pneumonia", tmp_path / "k", max_images=120, seed=1)
    train, test = list_image_folder(tmp_path / "k" / "train"), list_image_folder(tmp_path / "k" / "test")
    assert (len(train), len(test)) == (sizes["train"], sizes["test"]) and 90 <= len(train) + len(test) <= 150
    assert {r.label for r in test} == {"normal", "pneumonia"} and {r.label for r in train} == {"normal", "pneumonia"}
    assert not _patients(tmp_path / "k" / "train") & _patients(tmp_path / "k" / "test")
    assert all(p.is_symlink() or p.is_dir() for p in (tmp_path / "k").rglob("*"))
    again = split_folder(shared_data / "kermany-pneumonia", tmp_path / "k", max_images=120, seed=1)
    assert again == sizes  # an earlier split is replaced, the same one for the same seed


def test_segmentation_split_pairs_masks(shared_data: Path, tmp_path: Path) -> None:
    sizes = split_folder(shared_data / "lung-seg", tmp_path / "s", max_images=40)
    for side in ("train", "test"):
        images = sorted(p.name for p in (tmp_path / "s" / side / "images").iterdir())
        assert images == sorted(p.name for p in (tmp_path / "s" / side / "masks").iterdir())
        assert len(images) == sizes[side] > 0
    assert not _patients(tmp_path / "s" / "train") & _patients(tmp_path / "s" / "test")


def test_refuses_a_folder_with_files_of_its_own(shared_data: Path, tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="files of its own"):
        split_folder(shared_data / "lung-seg", tmp_path / "mine", max_images=40)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
