"""Job errors shown to clients never contain the worker's temporary folder."""

from __future__ import annotations

from pathlib import Path

from worker.runtime import public_error


def test_public_error_strips_the_work_folder(tmp_path: Path) -> None:
    work = tmp_path / "cxrsynth-train-1234"
    exc = FileNotFoundError(f"cannot identify image file '{work}/data/normal/a.png' (no images in {work})")
    text = public_error(exc, work)
    assert text == "FileNotFoundError: cannot identify image file 'data/normal/a.png' (no images in <work folder>)"
    assert str(tmp_path) not in text
