"""Our outputs feed our own commands: ``generate``'s folder goes straight into ``privacy-check``,
``pretrain --data`` and ``evaluate`` (it holds ``privacy_report.png`` beside the label folders, which
every reader skips), and ``generate`` ends with the privacy gate's verdict."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from app.cli import app
from models.data.folders import SIDECAR_IMAGES, list_image_folder

runner = CliRunner()


def _ok(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())  # rich wraps long lines


def test_generate_output_feeds_privacy_check_pretrain_and_evaluate(embedded: Any, tiny_generator: Path,
                                                                    shared_data: Path, tmp_path: Path) -> None:
    from models.data import write_image_folder
    from models.diffusion.testing import tiny_training_data

    out = tmp_path / "out"
    said = _ok(["generate", "--counts", "normal=6,pneumonia=6", "--out", str(out), "--generator", str(tiny_generator),
                "--sampler", "ddim", "--steps", "4", "--seed", "3"])
    assert "privacy gate passed" in said and "of 12 images" in said, said
    assert str(embedded.data_dir) in said
    assert (out / "privacy_report.png").is_file() and set(SIDECAR_IMAGES) == {"privacy_report.png"}
    records = list_image_folder(out)
    assert len(records) == 12 and {r.label for r in records} == {"normal", "pneumonia"}

    train = tiny_training_data(shared_data / "pneumoniamnist" / "pneumoniamnist_28.npz")  # what it learnt from
    assert train.labels is not None
    real = write_image_folder(train.images, train.labels, tmp_path / "real", list(train.label_names))
    report = tmp_path / "privacy.json"
    _ok(["privacy-check", "--train-data", str(real), "--images", str(out), "--generator", str(tiny_generator),
         "--json", str(report)])
    assert json.loads(report.read_text())["counts"]["images"] == 12

    enc = tmp_path / "enc"
    _ok(["pretrain", "--data", str(out), "--out", str(enc), "--steps", "2", "--method", "simclr",
         "--resolution", "32", "--batch-size", "4"])
    assert json.loads((enc / "config.json").read_text())["pretraining"]["data"]["num_images"] == 12

    cls = tmp_path / "cls.json"
    _ok(["evaluate", "classification", "--encoder", str(enc), "--train-data", str(out), "--test-data", str(real),
         "--mode", "linear", "--bootstrap", "20", "--json", str(cls)])
    split = json.loads(cls.read_text())["split"]
    assert split["train"] + split["val"] == 12 and split["test"] == 128


def test_hidden_entries_and_sidecars_are_skipped_but_mixed_layouts_still_fail(tmp_path: Path) -> None:
    from PIL import Image

    root = tmp_path / "d"
    for rel in ("normal/a.png", "pneumonia/b.png", ".ipynb_checkpoints/c.png", "normal/.d.png", "privacy_report.png"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (8, 8)).save(root / rel)
    assert sorted(r.path.name for r in list_image_folder(root)) == ["a.png", "b.png"]
    Image.new("L", (8, 8)).save(root / "loose.png")
    with pytest.raises(ValueError, match="mixes images"):
        list_image_folder(root)
