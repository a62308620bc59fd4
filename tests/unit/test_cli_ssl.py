"""``cxrsynth pretrain`` and ``cxrsynth evaluate`` on tiny slices of the real data: the encoder folder and the
JSON reports are right, Ctrl-C checkpoints and ``--resume`` continues, bad input fails with one clear line,
and ``pretrain --dataset-id`` runs a pretraining job on the embedded service."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from rich.progress import Progress
from typer.testing import CliRunner

from app import cli_ssl
from app.cli import app

torch.set_num_threads(1)
runner = CliRunner()
TINY = ["--resolution", "32", "--batch-size", "4"]


def _link_slice(src: Path, dest: Path, start: int, n: int) -> Path:
    """An ImageFolder of ``n`` images per class of the Kermany folder (symlinks, nothing copied)."""
    for label in ("NORMAL", "PNEUMONIA"):
        (dest / label).mkdir(parents=True)
        for f in sorted((src / label).iterdir())[start : start + n]:
            (dest / label / f.name).symlink_to(f)
    return dest


def _link_seg_slice(src: Path, dest: Path, start: int, n: int) -> Path:
    for sub in ("images", "masks"):
        (dest / sub).mkdir(parents=True)
    for f in sorted((src / "images").iterdir())[start : start + n]:
        (dest / "images" / f.name).symlink_to(f)
        (dest / "masks" / f.name).symlink_to(src / "masks" / f.name)
    return dest


@pytest.fixture(scope="module")
def slices(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    kermany, lungs = shared_data / "kermany-pneumonia", shared_data / "lung-seg"
    if not kermany.is_dir() or not lungs.is_dir():
        pytest.skip("kermany-pneumonia or lung-seg missing from the shared data")
    root = tmp_path_factory.mktemp("slices")
    return {
        "train": _link_slice(kermany, root / "train", 0, 10),
        "test": _link_slice(kermany, root / "test", 200, 5),
        "seg_train": _link_seg_slice(lungs, root / "seg_train", 0, 12),
        "seg_test": _link_seg_slice(lungs, root / "seg_test", 400, 4),
    }


def _ok(args: list[str]) -> Any:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result


def _check_estimates(metrics: dict[str, dict[str, float]], names: set[str]) -> None:
    assert set(metrics) == names
    for m in metrics.values():
        assert m["low"] <= m["value"] <= m["high"] or m["value"] != m["value"]  # NaN only when undefined
        assert m["confidence"] == 0.95


def test_pretrain_then_evaluate_classification(slices: dict[str, Path], tmp_path: Path) -> None:
    enc = tmp_path / "enc"
    result = _ok(["pretrain", "--data", str(slices["train"]), "--out", str(enc), "--steps", "2", *TINY])
    assert "2 steps" in result.output
    cfg = json.loads((enc / "config.json").read_text())
    assert cfg["architecture"] == "resnet18" and cfg["resolution"] == 32 and cfg["method"] == "dino"
    assert cfg["pretraining"]["steps"] == 2 and cfg["pretraining"]["data"]["num_images"] == 20
    assert (enc / "model.safetensors").is_file() and "timm.create_model" in (enc / "README.md").read_text()
    assert not enc.with_name("enc.ckpt").exists()  # a finished run leaves no checkpoint behind

    out = tmp_path / "cls.json"
    _ok(["evaluate", "classification", "--encoder", str(enc), "--train-data", str(slices["train"]),
         "--test-data", str(slices["test"]), "--json", str(out), "--bootstrap", "100"])
    report = json.loads(out.read_text())
    assert report["task"] == "classification" and report["mode"] == "linear" and report["resolution"] == 32
    _check_estimates(report["metrics"], {"auc", "f1", "accuracy", "sensitivity", "specificity"})
    assert report["split"]["test"] == 10 and report["split"]["patient_level"] is True
    assert report["split"]["train"] + report["split"]["val"] == 20
    assert report["threshold"]["chosen_on"] == "validation"
    assert report["encoder"]["method"] == "dino"


def test_evaluate_classification_readouts_are_chosen_on_validation(slices: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "cls.json"
    _ok([*CLS, "--train-data", str(slices["train"]), "--test-data", str(slices["test"]), "--resolution", "32",
         "--readout", "avg", "--readout", "grid2@2x", "--json", str(out), "--bootstrap", "50"])
    sel = json.loads(out.read_text())["model_selection"]
    assert {c["readout"] for c in sel["candidates"]} == {"avg", "grid2@2x"}
    assert sel["chosen"]["readout"] in {"avg", "grid2@2x"} and sel["readouts"]["grid2@2x"]["input_px"] == 64


def test_pretrain_streams_webdataset_shards(slices: dict[str, Path], tmp_path: Path) -> None:
    """``--data`` also takes a folder of WebDataset shards (what `datasets export --format webdataset` holds)."""
    import io

    import webdataset as wds

    shards = tmp_path / "shards"
    shards.mkdir()
    files = sorted(slices["train"].rglob("*.jpeg"))
    for k in range(2):
        with wds.TarWriter(str(shards / f"data-{k:06d}.tar")) as sink:
            for f in files[k::2]:
                buf = io.BytesIO()
                with Image.open(f) as im:
                    im.convert("L").save(buf, format="PNG")
                sink.write({"__key__": f.stem, "png": buf.getvalue(), "cls": f.parent.name})
    enc = tmp_path / "enc-wds"
    result = _ok(["pretrain", "--data", str(shards), "--out", str(enc), "--steps", "2", *TINY])
    assert f"{len(files)} images" in result.output
    cfg = json.loads((enc / "config.json").read_text())
    assert cfg["pretraining"]["data"]["num_images"] == len(files) and cfg["pretraining"]["steps"] == 2
    empty = tmp_path / "empty-shards" / "shards"
    empty.mkdir(parents=True)
    bad = runner.invoke(app, ["pretrain", "--data", str(empty.parent), "--out", str(tmp_path / "x"), *TINY])
    assert bad.exit_code != 0 and "shards" in bad.output


def test_evaluate_segmentation_scratch_prints_json(slices: dict[str, Path]) -> None:
    result = runner.invoke(app, ["evaluate", "segmentation", "--encoder", "scratch", "--train-data",
                                 str(slices["seg_train"]), "--test-data", str(slices["seg_test"]), "--epochs", "1",
                                 "--resolution", "32", "--bootstrap", "100"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{"):])
    assert report["task"] == "segmentation" and report["mode"] == "finetune" and report["split"]["test"] == 4
    _check_estimates(report["metrics"], {"dice", "iou", "hd95"})
    assert 0.0 <= report["metrics"]["dice"]["value"] <= 1.0
    assert report["encoder"]["source"] == "scratch:resnet18"


class _InterruptAfterFirstStep(Progress):
    """A progress bar that presses Ctrl-C (SIGINT to this process) once the first step is reported."""

    def update(self, *args: Any, **kwargs: Any) -> None:
        super().update(*args, **kwargs)
        if kwargs.get("completed") == 1:
            os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_checkpoints_and_resume_continues(slices: dict[str, Path], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    enc, ckpt = tmp_path / "enc", tmp_path / "enc.ckpt"
    args = ["pretrain", "--data", str(slices["train"]), "--out", str(enc), "--steps", "3", *TINY]
    monkeypatch.setattr(cli_ssl, "progress_bar", lambda: _InterruptAfterFirstStep(console=cli_ssl.console))
    result = runner.invoke(app, args)
    assert result.exit_code == 130, result.output
    assert "--resume" in result.output and (ckpt / "checkpoint.pt").is_file() and not enc.exists()
    monkeypatch.undo()

    again = runner.invoke(app, args)  # without --resume: refuses to throw the state away
    assert again.exit_code == 2 and "--resume" in again.output
    _ok([*args, "--resume"])
    assert json.loads((enc / "config.json").read_text())["pretraining"]["steps"] == 3
    assert not ckpt.exists()
    missing = runner.invoke(app, [*args, "--resume"])
    assert missing.exit_code == 2 and "no checkpoint" in missing.output


@pytest.fixture
def bad_folders(slices: dict[str, Path], tmp_path: Path) -> dict[str, Path]:
    empty = tmp_path / "empty"
    empty.mkdir()
    one_class = tmp_path / "one_class"
    (one_class / "NORMAL").mkdir(parents=True)
    for f in sorted((slices["train"] / "NORMAL").iterdir())[:6]:
        (one_class / "NORMAL" / f.name).symlink_to(f.resolve())
    corrupt = _link_slice(slices["train"], tmp_path / "corrupt", 0, 10)
    (corrupt / "NORMAL" / "IM-9999-0001.jpeg").write_bytes(b"\xff\xd8 this is not a jpeg")
    mismatch = _link_seg_slice(slices["seg_train"], tmp_path / "mismatch", 0, 6)
    victim = sorted((mismatch / "masks").iterdir())[0]
    victim.unlink()
    Image.new("L", (100, 80)).save(victim, format="PNG")
    return {"empty": empty, "one_class": one_class, "corrupt": corrupt, "mismatch": mismatch}


CLS = ["evaluate", "classification", "--encoder", "scratch"]
SEG = ["evaluate", "segmentation", "--encoder", "scratch", "--epochs", "1"]


@pytest.mark.parametrize(("args", "needle"), [
    ([*CLS, "--train-data", "{empty}", "--test-data", "{test}"], "no images"),
    ([*CLS, "--train-data", "{one_class}", "--test-data", "{test}"], "only one class"),
    ([*CLS, "--train-data", "{corrupt}", "--test-data", "{test}"], "not a readable image"),
    ([*CLS, "--train-data", "{train}", "--test-data", "{train}"], "separate test folder"),
    ([*CLS, "--train-data", "{train}", "--test-data", "{test}", "--label-fraction", "0"], "--label-fraction"),
    ([*CLS, "--train-data", "{train}", "--test-data", "{test}", "--readout", "grid9"],
     "unknown linear-probe readout 'grid9': choose from avg, grid2, avg@2x, grid2@2x"),
    ([*CLS, "--train-data", "{train}", "--test-data", "{test}", "--mode", "finetune", "--readout", "grid2"],
     "--readout applies to --mode linear only"),
    (["evaluate", "classification", "--encoder", "/no/such/encoder", "--train-data", "{train}", "--test-data",
      "{test}"], "encoder not found"),
    ([*SEG, "--train-data", "{mismatch}", "--test-data", "{seg_test}"], "size mismatch"),
    ([*SEG, "--train-data", "{train}", "--test-data", "{seg_test}"], "images/ and masks/"),
    (["pretrain", "--out", "{tmp}/enc"], "either --data"),
    (["pretrain", "--out", "{tmp}/enc", "--data", "{train}", "--dataset-id", "x"], "either --data"),
    (["pretrain", "--out", "{tmp}/enc", "--data", "{train}", "--steps", "2", "--epochs", "1"], "not both"),
    (["pretrain", "--out", "{tmp}/enc", "--data", "{train}", "--resolution", "40"], "multiple of 16"),
    (["pretrain", "--out", "{tmp}/enc", "--data", "{empty}", "--steps", "1"], "no images"),
])
def test_bad_input_fails_clearly(args: list[str], needle: str, slices: dict[str, Path],
                                 bad_folders: dict[str, Path], tmp_path: Path) -> None:
    paths = {**{k: str(v) for k, v in slices.items()}, **{k: str(v) for k, v in bad_folders.items()},
             "tmp": str(tmp_path)}
    result = runner.invoke(app, [a.format(**paths) for a in args])
    assert result.exit_code == 2, result.output
    assert needle in " ".join(result.output.split())  # rich wraps long lines
    assert "Traceback" not in result.output
    assert not (tmp_path / "enc").exists()


def test_pretrain_dataset_id_runs_an_embedded_job(embedded: Any, slices: dict[str, Path], tmp_path: Path) -> None:
    from app.cli_common import local_tenant
    from app.db.orm import Encoder, Job
    from app.db.session import get_sessionmaker, migrate
    from app.services.datasets import create_uploaded_dataset
    from app.services.uploads import _write_png
    from app.storage import build_store
    from worker.exports import run_dataset_build

    migrate(embedded.database_url)
    images = []
    for f in sorted(slices["train"].rglob("*.jpeg")):
        with Image.open(f) as im:
            images.append(_write_png(im.resize((48, 48)), f.parent.name.lower(), f.stem + ".png",
                                     tmp_path / "prepared", f.name))
    with get_sessionmaker(embedded.database_url)() as s:
        tenant = local_tenant(s)
        store = build_store(embedded)
        ds = create_uploaded_dataset(s, store, tenant.id, "kermany-slice", images)
        ds_id = ds.id
    run_dataset_build(get_sessionmaker(embedded.database_url), store, ds_id)  # the worker's part of an upload
    out = tmp_path / "enc"
    _ok(["pretrain", "--dataset-id", ds_id, "--out", str(out), "--steps", "2", "--method", "simclr", *TINY])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["method"] == "simclr" and cfg["pretraining"]["data"]["num_images"] == 20
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    with get_sessionmaker(embedded.database_url)() as s:
        job = s.query(Job).filter(Job.kind == "pretraining").one()
        assert job.status == "succeeded" and job.params["steps"] == 2 and job.params["dataset_ids"] == [ds_id]
        enc = s.get(Encoder, (job.result or {})["encoder_id"])
        assert enc is not None and enc.status == "ready" and enc.tenant_id == tenant.id
        assert enc.config["pretraining"]["steps"] == 2
