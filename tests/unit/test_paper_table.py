"""``benchmarks/paper_table.py``: the ``smoke`` profile end to end (table, JSON and plot written; the test
patients never reach a training set; a killed run continues from its cached cells; the best arm without real
images is exported and the service registers it as a built-in encoder), the arms registry, evaluation seeds
and their aggregation, the raw-pixel baseline, synthetic arms fed from a WebDataset export, the ``cpu-12`` and
``gpu-full`` profiles (plan, ViT-S/16 SSL steps)."""

from __future__ import annotations

import io
import json
import math
import re
import shutil
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from benchmarks import paper_table as pt
from models.data.folders import list_image_folder, patient_id_from_name

torch.set_num_threads(1)
ARGS = ["--profile", "smoke", "--arms", "scratch,real,synthetic,raw-pixels", "--fractions", "1", "--threads", "1"]


@pytest.fixture(scope="module")
def run(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if not (shared_data / "kermany-pneumonia").is_dir() or not (shared_data / "lung-seg").is_dir():
        pytest.skip("kermany-pneumonia or lung-seg missing from the shared data")
    root = tmp_path_factory.mktemp("paper")
    args = [*ARGS, "--data-dir", str(shared_data), "--cache-dir", str(root / "cache"), "--out-dir",
            str(root / "out"), "--export-dir", str(root / "weights" / "encoder-synthetic-resnet18-64")]
    doc = pt.main(args)
    return {"doc": doc, "root": root, "args": args, "run_dir": Path(doc["run_dir"])}


def test_outputs(run: dict[str, Any]) -> None:
    doc, out = run["doc"], run["root"] / "out"
    # 3 arms x 2 tasks x 2 modes, plus the raw-pixel baseline's one classification/linear cell; 100%: seed 0
    assert len(doc["cells"]) == 3 * 2 * 2 + 1 and doc["cells_computed_this_run"] == 13
    assert all(c["seed"] == 0 for c in doc["cells"].values())
    for cell in doc["cells"].values():
        for m in cell["metrics"].values():
            assert m["low"] <= m["value"] <= m["high"] or m["value"] != m["value"]
        assert cell["test_images"] == (20 if cell["task"] == "classification" else 8)
    raw = doc["cells"]["resnet18|raw-pixels|classification|linear|1|0"]
    assert raw["selected"]["C"] in pt.PROFILES["smoke"].cls_config["linear_c_grid"]
    assert raw["train_images"] + raw["val_images"] == 40
    assert set(doc["pretraining"]) == {"resnet18|real", "resnet18|synthetic"}
    assert all(p["steps"] == 2 for p in doc["pretraining"].values())  # same budget for every arm
    syn = doc["synthetic"]
    assert syn["source"] == "sampled in process" and syn["generator"] == "generator-kermany-224"
    assert syn["one_x"] == 4 and syn["multiplied"] == 16 and syn["resolution"] == 224 and syn["resized_to"] == 32
    assert Path(run["run_dir"]).name.startswith(f"smoke-{pt.PROFILES['smoke'].fingerprint()}-gen")
    md = (out / "paper_table-smoke.md").read_text()
    for arm in ("scratch", "real", "synthetic"):
        assert f"| {arm} | linear | " in md and f"| {arm} | finetune | " in md
    assert md.count("| raw-pixels | linear | ") == 1 and "| raw-pixels | finetune |" not in md
    assert "sampled in process from `generator-kermany-224`" in md and "bootstrap variances" in md
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
    dropped = "resnet18|synthetic|classification|linear|1|0"
    del cells[dropped]
    cells_file.write_text(json.dumps(cells))
    again = pt.main([*run["args"], "--no-export"])
    assert again["cells_computed_this_run"] == 1  # only the missing cell; SSL and sampling came from the cache
    assert again["cells"][dropped]["metrics"] == run["doc"]["cells"][dropped]["metrics"]  # seeded: same numbers
    assert {k: v for k, v in again["cells"].items() if k != dropped} == {
        k: v for k, v in run["doc"]["cells"].items() if k != dropped}



def test_cached_only_writes_what_finished_and_computes_nothing(run: dict[str, Any], tmp_path: Path) -> None:
    """A sitting ends mid-run: --cached-only tables the finished part. An arm whose SSL has no encoder yet and a
    cell group missing a cell are left out; nothing is trained or evaluated."""
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(run["root"] / "cache", cache)
    run_dir = cache / "runs" / run["run_dir"].name
    cells = json.loads((run_dir / "cells.json").read_text())
    dropped = "resnet18|synthetic|classification|linear|1|0"
    del cells[dropped]
    (run_dir / "cells.json").write_text(json.dumps(cells))
    (pt.encoder_dir(run_dir, "resnet18", "real") / "config.json").unlink()  # as if the real arm's SSL were cut
    args = [*run["args"], "--cache-dir", str(cache), "--out-dir", str(tmp_path / "out"), "--no-export", "--cached-only"]
    doc = pt.main(args)
    assert doc["cells_computed_this_run"] == 0
    assert not (pt.encoder_dir(run_dir, "resnet18", "real") / "config.json").is_file()  # no SSL was run
    assert "real" not in doc["selection"]["arms"] and not any(c["arm"] == "real" for c in doc["cells"].values())
    assert dropped not in doc["cells"] and "resnet18|synthetic|classification|linear|1" not in doc["aggregated"]
    kept = {k: v for k, v in run["doc"]["cells"].items() if k != dropped and v["arm"] != "real"}
    assert doc["cells"] == kept
    md = (tmp_path / "out" / "paper_table-smoke.md").read_text()
    assert "| synthetic | linear | — |" in md

def test_a_table_grows_across_runs_by_merging_earlier_results(run: dict[str, Any]) -> None:
    """Another machine (a fresh cache, so a fresh run folder) runs one arm and merges the committed JSON of
    the earlier run: the table holds both, and only the new arm's cells are computed."""
    root, earlier = run["root"], run["root"] / "out" / "paper_table-smoke.json"
    data_dir = run["args"][run["args"].index("--data-dir") + 1]
    doc = pt.main(["--profile", "smoke", "--arms", "scratch", "--tasks", "classification", "--modes", "linear",
                   "--fractions", "1", "--threads", "1", "--no-export", "--data-dir", data_dir,
                   "--cache-dir", str(root / "cache-elsewhere"), "--out-dir", str(root / "out-merged"),
                   "--merge", str(earlier), "--note", "scratch redone on machine B"])
    assert doc["cells_computed_this_run"] == 0  # the scratch cell came with the merged document
    earlier_cells = json.loads(earlier.read_text())["cells"]  # (another test may have rewritten a cell's timing)
    assert doc["cells"] == earlier_cells and set(doc["pretraining"]) == set(run["doc"]["pretraining"])
    assert doc["merged_from"][0]["cells_added"] == len(earlier_cells)
    assert set(doc["selection"]["arms"]) == {"scratch", "real", "synthetic", "raw-pixels"}
    md = (root / "out-merged" / "paper_table-smoke.md").read_text()
    assert "| synthetic | finetune | " in md and "- provenance: scratch redone on machine B" in md
    other = json.loads(earlier.read_text())
    other["profile"]["fingerprint"] = "0000000000"
    (root / "other.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="fingerprint"):
        pt.main(["--profile", "smoke", "--arms", "scratch", "--plan-only", "--data-dir", data_dir,
                 "--cache-dir", str(root / "cache-elsewhere"), "--merge", str(root / "other.json")])


def test_merged_synthetic_cells_of_another_source_never_stand_in(run: dict[str, Any]) -> None:
    """Cell keys do not name the synthetic export: a document whose synthetic arm read another export joins
    a run that computes the synthetic arm with its other arms only, so the new arm is computed, not skipped."""
    root, earlier = run["root"], run["root"] / "out" / "paper_table-smoke.json"
    data_dir = run["args"][run["args"].index("--data-dir") + 1]
    other = json.loads(earlier.read_text())
    other["run_dir"] = other["run_dir"].rsplit("-", 1)[0] + "-wds00000000"  # as if from another export
    (root / "other-source.json").write_text(json.dumps(other))
    base = ["--profile", "smoke", "--tasks", "classification", "--modes", "linear", "--fractions", "1",
            "--data-dir", data_dir, "--plan-only", "--merge", str(root / "other-source.json")]
    n_syn = sum(1 for k in other["cells"] if k.split("|")[1] in pt.SYNTHETIC_ARMS)
    assert n_syn > 0
    plan = pt.main([*base, "--arms", "synthetic,scratch", "--cache-dir", str(root / "cache-source-a")])
    assert plan["cells"] == 2 and plan["cells_cached"] == 1  # scratch came with the document, synthetic did not
    plan = pt.main([*base, "--arms", "scratch", "--cache-dir", str(root / "cache-source-b")])
    assert plan["cells_cached"] == 1  # no synthetic arm here: nothing to confuse, the document joins whole


def test_seeds_below_full_labels_are_distinct_cells(run: dict[str, Any]) -> None:
    root = run["root"]
    doc = pt.main(["--profile", "smoke", "--arms", "scratch,raw-pixels", "--tasks", "classification", "--modes",
                   "linear", "--fractions", "0.1,1", "--threads", "1", "--no-export", "--data-dir",
                   run["args"][run["args"].index("--data-dir") + 1], "--cache-dir", str(root / "cache"),
                   "--out-dir", str(root / "out-seeds")])
    assert doc["cells_computed_this_run"] == 2 * 3  # two arms x seeds 0, 1, 2 at 10%; 100% came from the cache
    for arm in ("scratch", "raw-pixels"):
        seeds = [doc["cells"][f"resnet18|{arm}|classification|linear|0.1|{s}"] for s in (0, 1, 2)]
        assert [c["seed"] for c in seeds] == [0, 1, 2]
        # the seed draws another label subsample (and validation patients): the cells differ
        assert len({json.dumps(c["metrics"], sort_keys=True) for c in seeds}) > 1
        group = doc["aggregated"][f"resnet18|{arm}|classification|linear|0.1"]
        assert group["seeds"] == [0, 1, 2] and group["metrics"]["auc"]["n_seeds"] == 3
        assert group["metrics"]["auc"]["value"] == pytest.approx(np.mean([c["metrics"]["auc"]["value"] for c in seeds]))
        assert doc["aggregated"][f"resnet18|{arm}|classification|linear|1"]["seeds"] == [0]


def test_shipped_encoder_is_served_as_builtin(run: dict[str, Any], tmp_path: Path) -> None:
    from app.core.config import Settings
    from app.db.orm import Encoder
    from app.db.session import get_sessionmaker, migrate
    from app.services.evaluations import resolve_evaluation_encoder
    from app.services.model_assets import encoder_out, ensure_builtin_encoders
    from app.services.tenants import create_tenant
    from models.ssl import load_encoder

    shipped = run["doc"]["shipped_encoder"]
    assert shipped["arm"] in pt.NO_REAL_ARMS and shipped["size_mb"] < 50
    folder = run["root"] / "weights" / "encoder-synthetic-resnet18-64"
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["weights_dtype"] == "float16" and cfg["metrics"]["arm"] == shipped["arm"]
    assert cfg["metrics"]["synthetic"]["source"] == "sampled in process"
    assert all(t.dtype == torch.float16 for t in load_file(str(folder / "model.safetensors")).values()
               if t.is_floating_point())
    card = (folder / "README.md").read_text()
    assert "no real image was used in pretraining" in card and "| classification | linear | 100% | 1 | auc |" in card
    assert "| this encoder [95% CI] | scratch |" in card  # the yardsticks stand beside it
    steps = run["doc"]["pretraining"][f"resnet18|{shipped['arm']}"]["steps"]
    assert re.search(rf"Budget: \w+ on resnet18 at 32 px, {steps:,} steps of batch \d+ = [\d,]+ image-views, "
                     r"\d+ min of wall time \(CPU", card), card  # the card states what the encoder cost
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
    from app.cli_common import run_embedded_job
    from app.db.session import get_sessionmaker
    from app.schemas.jobs import EvaluationRequest
    from app.services.datasets import create_uploaded_dataset
    from app.services.evaluations import create_evaluation
    from app.services.uploads import _write_png
    from app.storage import build_store
    from worker.exports import run_dataset_build

    ids = {}
    with get_sessionmaker(settings.database_url)() as s:
        for name in ("cls_train", "cls_test"):
            images = []
            for f in sorted((data / name).rglob("*.jpeg")):
                with Image.open(f) as im:
                    images.append(_write_png(im.resize((48, 48)), f.parent.name, f.stem + ".png",
                                             tmp_path / "prepared" / name, f.name))
            ids[name] = create_uploaded_dataset(s, build_store(settings), tenant_id, name, images).id
            run_dataset_build(get_sessionmaker(settings.database_url), build_store(settings), ids[name])
        request = EvaluationRequest.model_validate(
            {"encoder_id": encoder_id, "train_dataset_id": ids["cls_train"], "test_dataset_id": ids["cls_test"]})
        job, _ = create_evaluation(s, settings, tenant_id, request, enqueue=False)
        job_id = job.id
    job, _ = run_embedded_job(settings, job_id, "evaluation")
    return job


# --------------------------------------------------------------------------------------------------
# Arms, seeds, aggregation
# --------------------------------------------------------------------------------------------------
def test_arms_registry() -> None:
    assert pt.ARMS == ("scratch", "real", "synthetic", "synthetic-4x", "real+synthetic", "raw-pixels")
    assert pt.NO_REAL_ARMS == ("synthetic", "synthetic-4x")
    assert pt.SYNTHETIC_ARMS == ("synthetic", "synthetic-4x", "real+synthetic")
    assert [pt.arm_spec(a).synthetic_count(10, 4) for a in pt.ARMS] == [0, 0, 10, 40, 10, 0]
    assert all(p.synthetic_multiplier == 4 for p in pt.PROFILES.values())
    with pytest.raises(ValueError, match="unknown arm 'synthetic-5x'"):
        pt.arm_spec("synthetic-5x")
    with pytest.raises(SystemExit, match="unknown arms"):
        pt.main(["--profile", "smoke", "--arms", "scratch,synthetic-5x", "--plan-only"])
    # each arm has its own tasks and modes: the raw-pixel baseline is classification / linear only
    cells = pt.plan_cells(pt.PROFILES["smoke"], ["raw-pixels", "real"], list(pt.TASKS), list(pt.MODES), [1.0])
    assert [(c.arm, c.task, c.mode) for c in cells if c.arm == "raw-pixels"] == [
        ("raw-pixels", "classification", "linear")]
    assert len([c for c in cells if c.arm == "real"]) == 4


def test_plan_gives_every_small_fraction_each_seed() -> None:
    profile = pt.PROFILES["smoke"]
    cells = pt.plan_cells(profile, ["scratch"], ["classification"], ["linear"], [0.1, 1.0])
    assert [c.key for c in cells] == ["resnet18|scratch|classification|linear|0.1|0",
                                      "resnet18|scratch|classification|linear|0.1|1",
                                      "resnet18|scratch|classification|linear|0.1|2",
                                      "resnet18|scratch|classification|linear|1|0"]
    # seeds are a selection, like fractions: they leave the run folder (the fingerprint) as it is
    assert pt.Profile(**{**profile.__dict__, "seeds_small_fractions": (0, 1)}).fingerprint() == profile.fingerprint()
    with pytest.raises(ValueError, match="distinct"):
        pt.Profile(name="x", backbones=("resnet18",), resolution=32, seeds_small_fractions=(0, 0))


def test_cells_written_before_seeds_count_as_seed_0(tmp_path: Path) -> None:
    path = tmp_path / "cells.json"
    old = {"backbone": "resnet18", "arm": "real", "task": "classification", "mode": "linear", "label_fraction": 1.0,
           "metrics": {"auc": {"value": 0.9, "low": 0.8, "high": 0.95}}, "wall_seconds": 1.0}
    path.write_text(json.dumps({"resnet18|real|classification|linear|1": old}))
    store = pt.CellStore(path)
    key = pt.cell_key("resnet18", "real", "classification", "linear", 1.0, 0)
    assert key in store and store.cells[key]["seed"] == 0 and list(store.cells) == [key]
    store.put(pt.cell_key("resnet18", "real", "classification", "linear", 1.0, 1), {**old, "seed": 1})
    assert sorted(json.loads(path.read_text())) == [key, key[:-1] + "1"]


def _cell(fraction: float, seed: int, value: float, low: float, high: float, hd95: float = 5.0) -> dict[str, Any]:
    return {"backbone": "resnet18", "arm": "real", "task": "segmentation", "mode": "linear", "label_fraction": fraction,
            "seed": seed, "metrics": {"dice": {"value": value, "low": low, "high": high},
                                      "hd95": {"value": hd95, "low": hd95 - 4, "high": hd95 + 4}}}


def test_seed_aggregation_on_hand_made_cells() -> None:
    se = 0.02
    half = pt.Z95 * se
    cells = {f"k{s}": _cell(0.1, s, v, v - half, v + half) for s, v in ((2, 0.84), (0, 0.80), (1, 0.82))}
    cells["full"] = _cell(1.0, 0, 0.9, 0.85, 0.93)
    cells["nan"] = _cell(0.01, 0, float("nan"), float("nan"), float("nan"))
    agg = pt.aggregate_cells(cells)
    assert set(agg) == {"resnet18|real|segmentation|linear|0.1", "resnet18|real|segmentation|linear|1",
                        "resnet18|real|segmentation|linear|0.01"}
    g = agg["resnet18|real|segmentation|linear|0.1"]
    assert g["seeds"] == [0, 1, 2]
    dice = g["metrics"]["dice"]
    # mean 0.82; seed sd 0.02; half-width 1.96 * sqrt(0.02^2 (test set, not averaged) + 0.02^2 / 3)
    expected = pt.Z95 * math.sqrt(se**2 + 0.02**2 / 3)
    assert dice["value"] == pytest.approx(0.82) and dice["seed_sd"] == pytest.approx(0.02)
    assert dice["low"] == pytest.approx(0.82 - expected) and dice["high"] == pytest.approx(0.82 + expected)
    assert dice["n_seeds"] == 3 and dice["high"] - dice["low"] > 2 * half  # wider than one seed's CI
    # one seed keeps its own CI; an undefined metric stays undefined
    assert {k: agg["resnet18|real|segmentation|linear|1"]["metrics"]["dice"][k] for k in ("value", "low", "high")} \
        == {"value": 0.9, "low": 0.85, "high": 0.93}
    assert math.isnan(agg["resnet18|real|segmentation|linear|0.01"]["metrics"]["dice"]["value"])
    # bounds: unit metrics are clipped to [0, 1], distances only from below
    near_one = pt.combine_seeds([{"value": v, "low": v - 0.05, "high": min(1.0, v + 0.05)} for v in (0.97, 1.0)])
    assert near_one["high"] == 1.0 and near_one["value"] == pytest.approx(0.985)
    hd95 = g["metrics"]["hd95"]  # identical seeds: no seed part, the bootstrap CI as it was; not clipped at 1
    assert (hd95["value"], hd95["low"], hd95["high"]) == pytest.approx((5.0, 1.0, 9.0))


def test_arms_are_compared_on_the_groups_they_all_have() -> None:
    """An arm whose segmentation cells are not run yet must not win by their absence (Dice < AUC)."""
    def group(arm: str, task: str, value: float) -> dict[str, Any]:
        metric = pt.PRIMARY[task]
        return {"backbone": "resnet18", "arm": arm, "task": task, "mode": "linear", "label_fraction": 0.1,
                "metrics": {metric: {"value": value, "low": value, "high": value}}}

    agg = {"a": group("synthetic", "classification", 0.97), "b": group("synthetic", "segmentation", 0.80),
           "c": group("synthetic-4x", "classification", 0.95)}
    assert pt.arm_score(agg, "resnet18", "synthetic-4x") > pt.arm_score(agg, "resnet18", "synthetic")  # unfair
    common = pt._slots(agg, "resnet18", "synthetic") & pt._slots(agg, "resnet18", "synthetic-4x")
    assert common == {("classification", "linear", 0.1)}
    assert pt.arm_score(agg, "resnet18", "synthetic", common) == pytest.approx(0.97)
    assert pt.arm_score(agg, "resnet18", "synthetic-4x", common) == pytest.approx(0.95)


# --------------------------------------------------------------------------------------------------
# Raw-pixel baseline
# --------------------------------------------------------------------------------------------------
def _pixel_problem(n: int, seed: int, signal: float) -> tuple[np.ndarray, np.ndarray]:
    """``n`` 32x32 uint8 noise images; class 1 has a brighter 8x8 patch (``signal`` noise SDs)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.normal(128, 20, (n, 32, 32))
    x[:, 4:12, 4:12] += 20 * signal * y[:, None, None]
    return np.clip(x, 0, 255).astype(np.uint8), y


def test_raw_pixel_baseline_beats_chance() -> None:
    from models.evaluation import auc_rows

    (xtr, ytr), (xv, yv), (xte, yte) = (_pixel_problem(n, s, 1.0) for n, s in ((60, 0), (60, 1), (200, 2)))
    model, selection = pt.fit_pixel_probe(pt.pixel_features(xtr), ytr, pt.pixel_features(xv), yv, (0.01, 1.0))
    auc = float(auc_rows(model.predict_proba(pt.pixel_features(xte))[:, 1], yte)[0])
    assert auc > 0.95  # chance is 0.5
    assert [c["C"] for c in selection["candidates"]] == [0.01, 1.0]


def test_raw_pixel_c_is_chosen_on_validation() -> None:
    grid = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
    (xtr, ytr), (xv, yv) = _pixel_problem(40, 0, 0.3), _pixel_problem(200, 1, 0.3)
    ftr, fv = pt.pixel_features(xtr), pt.pixel_features(xv)
    _, sel = pt.fit_pixel_probe(ftr, ytr, fv, yv, grid)
    aucs = {c["C"]: c["validation_auc"] for c in sel["candidates"]}
    assert sorted(aucs) == sorted(grid) and len(set(aucs.values())) > 1
    assert sel["chosen"]["C"] == max(aucs, key=lambda c: (aucs[c], -c))
    # flipped validation labels turn every validation AUC into 1 - AUC: the choice must follow them
    _, flipped = pt.fit_pixel_probe(ftr, ytr, fv, 1 - yv, grid)
    assert flipped["chosen"]["C"] == min(aucs, key=lambda c: (aucs[c], -c)) != sel["chosen"]["C"]


# --------------------------------------------------------------------------------------------------
# Synthetic arms from a WebDataset export
# --------------------------------------------------------------------------------------------------
def _write_shards(folder: Path, n: int, per_shard: int, card: dict[str, Any] | None = None) -> list[str]:
    """``n`` samples ``KEY.png`` (48x48 grey) + ``KEY.cls`` in shards of ``per_shard``; returns the keys in order."""
    import webdataset as wds

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    keys = []
    for start in range(0, n, per_shard):
        with wds.TarWriter(str(folder / f"data-{start // per_shard:06d}.tar")) as sink:
            for i in range(start, min(n, start + per_shard)):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (48, 48), dtype=np.uint8)).save(buf, format="PNG")
                keys.append(f"{i:07d}")
                sink.write({"__key__": keys[-1], "png": buf.getvalue(), "cls": str(i % 2).encode()})
    if card is not None:
        (folder / "card.json").write_text(json.dumps(card))
    return keys


CARD = {"dataset": {"id": "ds-1", "name": "syn-test", "version": "sha256:abc", "origin": "synthetic"},
        "generator": {"id": "gen-1", "name": "generator-kermany-224", "resolution": 224},
        "privacy": {"gate_status": "passed", "summary": {"threshold": 0.9}}}


def test_synthetic_subset_takes_the_first_samples(tmp_path: Path) -> None:
    from models.ssl.shards import index_shards, iter_samples

    keys = _write_shards(tmp_path / "syn", 10, 3)
    export = pt.open_synthetic(str(tmp_path / "syn"))
    assert export.index.num_samples == 10 and export.card is None
    assert pt.synthetic_subset(export, 10, tmp_path / "work") == str(tmp_path / "syn")  # all of it: as given
    for n in (3, 4, 8):
        subset = pt.synthetic_subset(export, n, tmp_path / "work")
        assert isinstance(subset, pt.SubsetShards) and (subset.tail is None) == (n % 3 == 0)
        index = index_shards(subset)
        assert index.num_samples == n
        got = [s["__key__"] for shard, count in zip(index.shards, index.counts, strict=True)
               for s in iter_samples(index.source, shard, count)]
        assert got == keys[:n]
    with pytest.raises(SystemExit, match="holds 10 images; 16 are needed"):
        pt.synthetic_subset(export, 16, tmp_path / "work")
    with pytest.raises(SystemExit, match="not a folder of WebDataset shards"):
        pt.open_synthetic(str(tmp_path / "work" / "absent"))
    with pytest.raises(SystemExit, match="an export archive"):
        pt.open_synthetic(str(tmp_path / "syn" / "data-000000.tar"))


def test_synthetic_export_feeds_the_synthetic_arms(shared_data: Path, tmp_path: Path) -> None:
    if not (shared_data / "kermany-pneumonia").is_dir() or not (shared_data / "lung-seg").is_dir():
        pytest.skip("kermany-pneumonia or lung-seg missing from the shared data")
    keys = _write_shards(tmp_path / "syn", 20, 3, CARD)
    doc = pt.main(["--profile", "smoke", "--synthetic", str(tmp_path / "syn"), "--arms",
                   "synthetic,synthetic-4x,real+synthetic", "--tasks", "classification", "--modes", "linear",
                   "--fractions", "1", "--threads", "1", "--no-export", "--data-dir", str(shared_data),
                   "--cache-dir", str(tmp_path / "cache"), "--out-dir", str(tmp_path / "out")])
    syn = doc["synthetic"]
    assert syn["source"] == "webdataset export" and syn["images_in_export"] == 20 and syn["card"] == "card.json"
    assert syn["privacy_gate"] == "passed" and syn["generator"]["name"] == "generator-kermany-224"
    assert syn["dataset"]["version"] == "sha256:abc" and syn["one_x"] == 4 and syn["multiplied"] == 16
    pre = doc["pretraining"]
    assert {k: p["images"] for k, p in pre.items()} == {
        "resnet18|synthetic": 4, "resnet18|synthetic-4x": 16, "resnet18|real+synthetic": 8}
    assert pre["resnet18|synthetic"]["data"] == "syn (first 4 samples)"  # streamed from the shards
    assert pre["resnet18|synthetic-4x"]["data"] == "syn (first 16 samples)"
    run_dir = Path(doc["run_dir"])
    assert run_dir.name.endswith(f"-wds{pt.open_synthetic(str(tmp_path / 'syn')).identity()}")
    mixed = sorted(p.name for p in (run_dir / "data" / "ssl_real_synthetic").rglob("*.png"))
    assert len(mixed) == 4 and all(f"-{k}.png" in " ".join(mixed) for k in keys[:4])
    md = (tmp_path / "out" / "paper_table-smoke.md").read_text()
    assert "WebDataset export" in md and "privacy gate passed" in md and "first 4 (1x) and 16 (4x)" in md


# --------------------------------------------------------------------------------------------------
# cpu-12 and gpu-full
# --------------------------------------------------------------------------------------------------
def test_cpu12_plan_prints_its_eta(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    profile = pt.PROFILES["cpu-12"]
    assert profile.backbones == ("resnet18",) and profile.resolution == 64 and profile.segmentation_resolution >= 128
    assert profile.ssl_real_images is None and profile.cls_train_images is None and profile.cls_test_images is None
    assert profile.ssl_steps * profile.ssl_batch >= 150_000
    assert pt.pretrain_config(profile, "resnet18").precision == "auto"
    plan = pt.main(["--profile", "cpu-12", "--plan-only", "--cache-dir", str(tmp_path), "--data-dir", str(tmp_path)])
    # 5 encoder arms x 2 tasks x 2 modes x (3 seeds at 1% and 10% + 1 at 100%), the baseline's 7 cells
    assert plan["cells"] == 5 * 2 * 2 * 7 + 7 and plan["cells_cached"] == 0
    eta = plan["eta"]
    assert eta["ssl_s"] == pytest.approx(4 * profile.ssl_steps * profile.assumed_rates["ssl_s_per_step"])
    assert eta["sampling_s"] > 0 and eta["total_s"] == pytest.approx(eta["sampling_s"] + eta["ssl_s"]
                                                                    + eta["evaluation_s"])
    out = capsys.readouterr().out
    assert "ETA" in out and "ASSUMED" in out and "150,400 image-views" in out and "segmentation 128 px" in out


def test_gpu_full_needs_a_large_export(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="at least 100,000 images: pass --synthetic"):
        pt.main(["--profile", "gpu-full", "--plan-only", "--cache-dir", str(tmp_path), "--data-dir", str(tmp_path)])
    _write_shards(tmp_path / "syn", 6, 3)
    with pytest.raises(SystemExit, match="holds 6"):
        pt.main(["--profile", "gpu-full", "--plan-only", "--synthetic", str(tmp_path / "syn"),
                 "--cache-dir", str(tmp_path), "--data-dir", str(tmp_path)])


def test_vit_small_224_ssl_steps_on_cpu() -> None:
    from models.ssl import pretrain

    profile = pt.PROFILES["gpu-full"]
    assert profile.backbones[0] == "vit_small_patch16_224" and profile.resolution == 224
    cfg = pt.pretrain_config(profile, "vit_small_patch16_224").replace(
        max_steps=2, batch_size=2, n_local_crops=0, warmup_steps=0, checkpoint_every=2)
    images = np.random.default_rng(0).integers(0, 256, (4, 224, 224), dtype=np.uint8)
    result = pretrain(images, cfg, None, device="cpu")
    assert result.steps == 2 and len(result.losses) == 2 and all(math.isfinite(x) for x in result.losses)
    assert result.backbone == "vit_small_patch16_224"


def test_tar_members_are_copied_whole(tmp_path: Path) -> None:
    """The tail copy of a shard keeps every member of each sample (image, label, json) byte for byte."""
    from models.ssl.shards import LocalShards

    _write_shards(tmp_path / "syn", 5, 5)
    pt.copy_first_samples(LocalShards(tmp_path / "syn"), "data-000000.tar", 2, tmp_path / "tail.tar")
    with tarfile.open(tmp_path / "syn" / "data-000000.tar") as a, tarfile.open(tmp_path / "tail.tar") as b:
        names = b.getnames()
        assert names == a.getnames()[:4]  # two samples x (cls, png)
        for name in names:
            assert b.extractfile(name).read() == a.extractfile(name).read()  # type: ignore[union-attr]


def test_synthetic_words_never_claim_more_images_than_the_export_holds() -> None:
    syn = {"source": "webdataset export", "one_x": 4013, "multiplied": 16052, "images_in_export": 4100,
           "location": "wds", "dataset": {}, "generator": {}}
    words = pt.synthetic_words(syn, 4)
    assert "the first 4,013 (1x) of the 4,100 images" in words and "16,052" not in words
    assert "the first 4,013 (1x) and 16,052 (4x) of the 20,000" in pt.synthetic_words(
        {**syn, "images_in_export": 20000}, 4)


# --------------------------------------------------------------------------------------------------
# --encoder: an arm evaluated from an exported encoder
# --------------------------------------------------------------------------------------------------
def _given_args(run: dict[str, Any], root: Path, arms: str, *extra: str) -> list[str]:
    data_dir = run["args"][run["args"].index("--data-dir") + 1]
    return ["--profile", "smoke", "--arms", arms, "--tasks", "classification", "--modes", "linear", "--fractions",
            "1", "--threads", "1", "--no-export", "--data-dir", data_dir, "--cache-dir", str(root / "cache"),
            "--out-dir", str(root / "out"), *extra]


def test_an_exported_encoder_stands_in_for_its_arms_ssl(run: dict[str, Any], tmp_path: Path) -> None:
    """Another machine has the real arm's exported encoder, not its run folder: --encoder evaluates it without
    pretraining, and the cell equals the one computed from the encoder where it was pretrained (seeded)."""
    exported = pt.encoder_dir(run["run_dir"], "resnet18", "real")
    doc = pt.main(_given_args(run, tmp_path, "real", "--encoder", f"real={exported}"))
    key = "resnet18|real|classification|linear|1|0"
    assert doc["cells_computed_this_run"] == 1 and not (Path(doc["run_dir"]) / "checkpoints").exists()
    assert doc["cells"][key]["metrics"] == run["doc"]["cells"][key]["metrics"]
    record = doc["pretraining"]["resnet18|real"]
    assert record["encoder_from"] == str(exported) and record["steps"] == run["doc"]["pretraining"][
        "resnet18|real"]["steps"]
    # A second invocation finds it in place; another encoder for the same arm in that run folder is refused.
    assert pt.main(_given_args(run, tmp_path, "real", "--encoder", f"real={exported}"))["cells_computed_this_run"] == 0
    other = tmp_path / "other-encoder"
    shutil.copytree(pt.encoder_dir(run["run_dir"], "resnet18", "synthetic"), other)
    with pytest.raises(SystemExit, match="already holds another encoder"):
        pt.main(_given_args(run, tmp_path, "real", "--encoder", f"real={other}"))


def test_encoders_of_another_recipe_or_unknown_source_are_refused(run: dict[str, Any], tmp_path: Path) -> None:
    exported = pt.encoder_dir(run["run_dir"], "resnet18", "real")
    changed = tmp_path / "changed"
    shutil.copytree(exported, changed)
    cfg = json.loads((changed / "config.json").read_text())
    cfg["pretraining"]["config"]["max_steps"] += 1
    cfg["pretraining"]["config"]["precision"] = "fp32"  # a runtime setting: not part of the recipe
    (changed / "config.json").write_text(json.dumps(cfg))
    for spec, match in ((f"real={changed}", r"another recipe .*max_steps 3 != 2"),
                        (f"real={tmp_path / 'absent'}", "not an exported cxrsynth encoder"),
                        (f"scratch={exported}", "not a pretrained arm"), (f"synthetic-4x={exported}", "not selected"),
                        (f"real{exported}", "expected ARM=DIR"),
                        # the smoke run sampled its synthetic images: no export to name its cells' source
                        (f"synthetic={pt.encoder_dir(run['run_dir'], 'resnet18', 'synthetic')}",
                         "records no WebDataset export")):
        with pytest.raises(SystemExit, match=match):
            pt.main([*_given_args(run, tmp_path, "real,synthetic", "--encoder", spec), "--plan-only"])
    assert not any((tmp_path / "cache").rglob("model.safetensors"))  # nothing was installed


def test_a_given_synthetic_encoder_names_its_export(run: dict[str, Any], tmp_path: Path) -> None:
    """A synthetic arm's exported encoder records the WebDataset export it read: the run folder is that export's
    (so merged cells of the same export join it), and another --synthetic export in the same run is refused."""
    given = tmp_path / "syn-encoder"
    shutil.copytree(pt.encoder_dir(run["run_dir"], "resnet18", "synthetic"), given)
    cfg = json.loads((given / "config.json").read_text())
    cfg["metrics"] = {"synthetic": {"source": "webdataset export", "location": "/gone/wds", "images_in_export": 10,
                                    "dataset": {"name": "syn-x", "version": "sha256:abc"}, "generator": {},
                                    "privacy_gate": "passed"}}
    (given / "config.json").write_text(json.dumps(cfg))
    shipped_as_4x = tmp_path / "shipped-4x"  # an export this benchmark shipped names its arm: no other arm takes it
    shutil.copytree(given, shipped_as_4x)
    as_4x = {**cfg, "metrics": {**cfg["metrics"], "arm": "synthetic-4x"}}
    (shipped_as_4x / "config.json").write_text(json.dumps(as_4x))
    with pytest.raises(SystemExit, match="that encoder is arm 'synthetic-4x', not 'synthetic'"):
        pt.main([*_given_args(run, tmp_path, "synthetic", "--encoder", f"synthetic={shipped_as_4x}"), "--plan-only"])
    doc = pt.main(_given_args(run, tmp_path, "synthetic", "--encoder", f"synthetic={given}"))
    assert Path(doc["run_dir"]).name.endswith(f"-wds{pt.export_identity('sha256:abc')}")
    assert doc["synthetic"]["dataset"]["name"] == "syn-x" and doc["cells_computed_this_run"] == 1
    md = (tmp_path / "out" / "paper_table-smoke.md").read_text()
    assert "the first 4 (1x) of the 10 images of the WebDataset export `/gone/wds`" in md
    _write_shards(tmp_path / "other", 20, 3)  # another export (no card: identity from its shards)
    with pytest.raises(SystemExit, match="must share their source"):
        pt.main([*_given_args(run, tmp_path, "synthetic,synthetic-4x", "--encoder", f"synthetic={given}",
                              "--synthetic", str(tmp_path / "other")), "--plan-only"])


def test_merged_synthetic_arms_of_another_export_join_when_not_recomputed(run: dict[str, Any],
                                                                          tmp_path: Path) -> None:
    """A run of synthetic-4x on a new export merges a table whose synthetic arm read an older export: the older
    synthetic cells join (this run does not compute that arm), and the table names their export apart."""
    earlier = json.loads((run["root"] / "out" / "paper_table-smoke.json").read_text())
    earlier["run_dir"] = earlier["run_dir"].rsplit("-", 1)[0] + "-wds00000000"
    earlier["synthetic"] = {"source": "webdataset export", "location": "/old/wds", "images_in_export": 4,
                            "one_x": 4, "multiplied": 16, "dataset": {"name": "old-export", "version": "v0"},
                            "generator": {}, "privacy_gate": "passed"}
    (tmp_path / "earlier.json").write_text(json.dumps(earlier))
    args = pt.parse_args(_given_args(run, tmp_path, "scratch", "--merge", str(tmp_path / "earlier.json")))
    s = pt.setup(args, None)
    s.arms = ["synthetic-4x"]  # as a run of the 4x arm: the merged synthetic arm is not recomputed
    _, sources = pt.merge_results(s, args.merge)
    assert sources[0]["synthetic_arms_from_another_source"] == ["synthetic"]
    assert any(k.split("|")[1] == "synthetic" for k in s.cells.cells)
    s2 = pt.setup(args, None)
    s2.run_dir, s2.cells = tmp_path / "fresh", pt.CellStore(tmp_path / "fresh-cells.json")
    s2.arms = ["synthetic"]  # recomputing the synthetic arm: the older export's cells must not stand in
    _, sources = pt.merge_results(s2, args.merge)
    assert sources[0]["synthetic_arms_from_another_source"] == []
    assert not any(k.split("|")[1] == "synthetic" for k in s2.cells.cells)
    doc = {"merged_from": [{"file": "earlier.json", "synthetic": earlier["synthetic"],
                            "synthetic_arms_from_another_source": ["synthetic"]}],
           "cells": {"k": {"arm": "synthetic"}}, "profile": {"synthetic_multiplier": 4}}
    (line,) = [x for x in pt._merged_source_lines(doc) if x]
    assert line.startswith("Arm(s) `synthetic` merged from `earlier.json`, another source: synthetic: the first 4")
    assert "old-export" in line
    # re-merged: the arm that document had merged from yet another export is credited to that one
    older = {**earlier["synthetic"], "location": "/older/wds", "dataset": {"name": "older-export", "version": "v-1"}}
    doc["cells"]["k2"] = {"arm": "synthetic-4x"}
    doc["merged_from"] = [{"file": "mid.json", "synthetic": earlier["synthetic"],
                           "synthetic_arms_from_another_source": ["synthetic", "synthetic-4x"],
                           "merged_from": [{"file": "first.json", "synthetic": older,
                                            "synthetic_arms_from_another_source": ["synthetic"]}]}]
    lines = [x for x in pt._merged_source_lines(doc) if x]
    assert [x.split(", another source")[0] for x in lines] == ["Arm(s) `synthetic-4x` merged from `mid.json`",
                                                              "Arm(s) `synthetic` merged from `first.json`"]
    assert "old-export" in lines[0] and "older-export" in lines[1]


def test_a_merged_best_arm_is_not_exported_from_a_run_without_its_encoder(run: dict[str, Any],
                                                                          tmp_path: Path) -> None:
    """The best arm without real images came with --merge: its encoder is in another run folder, so this run
    writes its table and says where to export it from, instead of failing or shipping another arm's card."""
    earlier = run["root"] / "out" / "paper_table-smoke.json"
    args = [a for a in _given_args(run, tmp_path, "scratch", "--merge", str(earlier)) if a != "--no-export"]
    doc = pt.main([*args, "--export-dir", str(tmp_path / "shipped")])
    assert doc["cells_computed_this_run"] == 0 and not (tmp_path / "shipped").exists()
    skipped = doc["shipped_encoder_not_exported"]
    assert skipped["best_arm"] == "synthetic" and "--encoder synthetic=" in skipped["reason"]
    assert "Shipped encoder not exported by this run" in (tmp_path / "out" / "paper_table-smoke.md").read_text()


def test_provenance_of_documents_merged_in_turn_is_kept() -> None:
    doc = {"provenance_note": "C here", "merged_from": [
        {"file": "b.json", "commit": "b1", "arms": ["x"], "provenance_note": "B there", "merged_from": [
            {"file": "a.json", "commit": "a1", "arms": ["y"], "provenance_note": "A long ago"}]}]}
    lines = pt._provenance_lines(doc)
    assert lines == ["- provenance: C here", "- provenance of merged `b.json` (commit b1, arms x): B there",
                     "- provenance of merged `a.json` (commit a1, merged into `b.json`, arms y): A long ago"]


def test_an_arm_keeps_its_colour_in_every_panel() -> None:
    """The legend is drawn on the first panel only: a panel without an arm must not shift the others' colours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = {"value": 0.9, "low": 0.8, "high": 0.95}
    agg = {pt.group_key("resnet18", arm, "classification", mode, 1.0): {"metrics": {"auc": m}}
           for arm, modes in (("raw-pixels", ("linear",)), ("real+synthetic", ("linear", "finetune")))
           for mode in modes}
    fig, (a, b) = plt.subplots(1, 2)
    arms = ["raw-pixels", "real+synthetic"]
    pt._plot_panel(a, agg, "resnet18", arms, "classification", "linear", [1.0])
    pt._plot_panel(b, agg, "resnet18", arms, "classification", "finetune", [1.0])
    colour = {c.get_label(): c.lines[0].get_color() for c in a.containers}
    (only,) = b.containers
    assert only.get_label() == "real+synthetic" and only.lines[0].get_color() == colour["real+synthetic"]
    assert colour["real+synthetic"] != colour["raw-pixels"]
    plt.close(fig)
