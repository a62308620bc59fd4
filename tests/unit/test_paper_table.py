"""``benchmarks/paper_table.py`` end to end on its ``smoke`` profile (three arms, 100% labels): table, JSON
and plot written; the test patients never reach a training set; a killed run continues from its cached
cells; the best arm without real images is exported and the service registers it as a built-in encoder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from benchmarks import paper_table as pt
from models.data.folders import list_image_folder, patient_id_from_name

torch.set_num_threads(1)
ARGS = ["--profile", "smoke", "--arms", "scratch,real,synthetic", "--fractions", "1", "--threads", "1"]


@pytest.fixture(scope="module")
def run(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if not (shared_data / "kermany-pneumonia").is_dir() or not (shared_data / "lung-seg").is_dir():
        pytest.skip("kermany-pneumonia or lung-seg missing from the shared data")
    root = tmp_path_factory.mktemp("paper")
    args = [*ARGS, "--data-dir", str(shared_data), "--cache-dir", str(root / "cache"), "--out-dir",
            str(root / "out"), "--export-dir", str(root / "weights" / "encoder-synthetic-resnet18-64")]
    doc = pt.main(args)
    return {"doc": doc, "root": root, "args": args,
            "run_dir": root / "cache" / "runs" / f"smoke-{pt.PROFILES['smoke'].fingerprint()}"}


def test_outputs(run: dict[str, Any]) -> None:
    doc, out = run["doc"], run["root"] / "out"
    assert len(doc["cells"]) == 3 * 2 * 2 and doc["cells_computed_this_run"] == 12
    for cell in doc["cells"].values():
        for m in cell["metrics"].values():
            assert m["low"] <= m["value"] <= m["high"] or m["value"] != m["value"]
        assert cell["test_images"] == (20 if cell["task"] == "classification" else 8)
    assert set(doc["pretraining"]) == {"resnet18|real", "resnet18|synthetic"}
    assert all(p["steps"] == 2 for p in doc["pretraining"].values())  # same budget for every arm
    assert doc["synthetic"]["one_x"] == 4 and doc["synthetic"]["five_x"] == 20
    md = (out / "paper_table-smoke.md").read_text()
    for arm in ("scratch", "real", "synthetic"):
        assert f"| {arm} | linear | " in md and f"| {arm} | finetune | " in md
    assert "python benchmarks/paper_table.py --profile smoke" in md and doc["commit"] in md
    assert json.loads((out / "paper_table-smoke.json").read_text())["cells"] == doc["cells"]
    with Image.open(out / "paper_table-smoke-resnet18.png") as im:
        assert im.format == "PNG" and im.size[0] > 500


def test_test_patients_never_train(run: dict[str, Any]) -> None:
    data = run["run_dir"] / "data"
    assert run["doc"]["data"]["leak_checks"] == {k: 0 for k in run["doc"]["data"]["leak_checks"]}
    test_patients = {r.patient_id for r in list_image_folder(data / "cls_test")}
    for name in ("cls_train", "ssl_real"):
        assert not {r.patient_id for r in list_image_folder(data / name)} & test_patients
    seg_train = {patient_id_from_name(p.name) for p in (data / "seg_train" / "images").iterdir()}
    seg_test = {patient_id_from_name(p.name) for p in (data / "seg_test" / "images").iterdir()}
    assert not seg_train & seg_test and not seg_train & test_patients


def test_a_killed_run_continues_from_its_cells(run: dict[str, Any]) -> None:
    cells_file = run["run_dir"] / "cells.json"
    cells = json.loads(cells_file.read_text())
    dropped = "resnet18|synthetic|classification|linear|1"
    del cells[dropped]
    cells_file.write_text(json.dumps(cells))
    again = pt.main([*run["args"], "--no-export"])
    assert again["cells_computed_this_run"] == 1  # only the missing cell; SSL and sampling came from the cache
    assert again["cells"][dropped]["metrics"] == run["doc"]["cells"][dropped]["metrics"]  # seeded: same numbers
    assert {k: v for k, v in again["cells"].items() if k != dropped} == {
        k: v for k, v in run["doc"]["cells"].items() if k != dropped}


def test_shipped_encoder_is_served_as_builtin(run: dict[str, Any], tmp_path: Path) -> None:
    from app.core.config import Settings
    from app.db.orm import Encoder
    from app.db.session import get_sessionmaker, migrate
    from app.services.model_assets import encoder_out, ensure_builtin_encoders
    from app.services.ssl_jobs import resolve_evaluation_encoder
    from app.services.tenants import create_tenant
    from models.ssl import load_encoder

    shipped = run["doc"]["shipped_encoder"]
    assert shipped["arm"] in pt.NO_REAL_ARMS and shipped["size_mb"] < 50
    folder = run["root"] / "weights" / "encoder-synthetic-resnet18-64"
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["weights_dtype"] == "float16" and cfg["metrics"]["arm"] == shipped["arm"]
    assert all(t.dtype == torch.float16 for t in load_file(str(folder / "model.safetensors")).values()
               if t.is_floating_point())
    card = (folder / "README.md").read_text()
    assert "no real image was used in pretraining" in card and "| classification | linear | 100% | auc |" in card
    assert load_encoder(folder)(torch.zeros(1, 1, 32, 32)).shape == (1, 64)

    settings = Settings(_env_file=None, data_dir=tmp_path / "state",  # type: ignore[call-arg]
                        default_generator_dir=run["root"] / "weights" / "generator-absent")
    migrate(settings.database_url)
    with get_sessionmaker(settings.database_url)() as s:
        (row,) = ensure_builtin_encoders(s, settings)
        out = encoder_out(row)
        assert out.name == "encoder-synthetic-resnet18-64" and out.builtin and out.status == "ready"
        assert out.metrics == cfg["metrics"] and "synthetic images only" in out.card
        tenant, _ = create_tenant(s, "hospital")
        assert resolve_evaluation_encoder(s, tenant.id, row.id) == (row.id, row.id, True)
        row_id, tenant_id = row.id, tenant.id
    # The worker evaluates the built-in encoder from its folder; its shared row gets no tenant's results.
    job = _evaluate_embedded(settings, tenant_id, row_id, run["run_dir"] / "data", tmp_path)
    assert job.status == "succeeded", job.error
    assert job.result["encoder"] == row_id and job.result["report"]["encoder"]["source"] == f"encoder {row_id}"
    assert job.result["report"]["resolution"] == 32
    with get_sessionmaker(settings.database_url)() as s:
        shared = s.get(Encoder, row_id)
        assert shared is not None and shared.metrics == cfg["metrics"]


def _evaluate_embedded(settings: Any, tenant_id: str, encoder_id: str, data: Path, tmp_path: Path) -> Any:
    """Upload train/test ImageFolders (the smoke run's classification folders) to the embedded store and run
    an evaluation job with the worker's code in this process."""
    from app.cli_ssl import run_embedded_job
    from app.db.session import get_sessionmaker
    from app.schemas.jobs import EvaluationRequest
    from app.services.datasets import create_uploaded_dataset
    from app.services.ssl_jobs import create_evaluation
    from app.services.uploads import _write_png
    from app.storage import build_store

    ids = {}
    with get_sessionmaker(settings.database_url)() as s:
        for name in ("cls_train", "cls_test"):
            images = []
            for f in sorted((data / name).rglob("*.jpeg")):
                with Image.open(f) as im:
                    images.append(_write_png(im.resize((48, 48)), f.parent.name, f.stem + ".png",
                                             tmp_path / "prepared" / name, f.name))
            ids[name] = create_uploaded_dataset(s, build_store(settings), tenant_id, name, images).id
        request = EvaluationRequest.model_validate(
            {"encoder_id": encoder_id, "train_dataset_id": ids["cls_train"], "test_dataset_id": ids["cls_test"]})
        job, _ = create_evaluation(s, settings, tenant_id, request, enqueue=False)
        job_id = job.id
    return run_embedded_job(settings, job_id, "evaluation")
