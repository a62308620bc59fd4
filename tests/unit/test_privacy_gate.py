"""The memorisation gate: exact search, calibration, planted copies caught, genuine samples pass, report, CLI.

The main proof (:func:`test_planted_copies_caught_genuine_samples_pass`) uses what ships: the Kermany
generator's privacy index and thresholds, copies and near-copies of its real training images, and
genuine samples of the generator itself.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from app.cli import app
from models.data.folders import images_to_array, list_image_folder
from models.privacy import (
    PRIVACY_CALIBRATION,
    MemorisationGate,
    PrivacyIndexMissing,
    build_privacy_index,
    load_privacy_index,
    save_privacy_index,
)
from models.privacy.embedding import load_embedder
from models.privacy.planting import PERTURBATIONS, plant_copies, shift
from models.privacy.report import ImageVerdict, privacy_report, write_privacy_png
from models.privacy.search import nearest_neighbours
from worker.tasks.privacy import attempt_seed, gate_batch

SHIPPED = Path(__file__).resolve().parents[2] / "models" / "weights" / "generator-kermany-64"
runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def kermany(shared_data: Path) -> dict[str, Any]:
    """The Kermany training folder at 64 px (the shipped generator's resolution), with patient ids."""
    records = list_image_folder(shared_data / "kermany-pneumonia")
    images = images_to_array([r.path for r in records], 64, "pad", threads=2)
    return {"images": images, "records": records, "patients": [r.patient_id for r in records]}


@pytest.fixture(scope="module")
def small_gate(kermany: dict[str, Any]) -> MemorisationGate:
    """A gate over 160 Kermany images (leave-one-out calibration with patient ids)."""
    sel = np.arange(0, len(kermany["images"]), len(kermany["images"]) // 160)[:160]
    embedder = load_embedder(device="cpu")
    index, cal = build_privacy_index(kermany["images"][sel], patient_ids=[kermany["patients"][i] for i in sel],
                                     embedder=embedder, source="kermany subset")
    return MemorisationGate(index, cal, embedder)


# --- exact search -----------------------------------------------------------------------------------


def test_nearest_neighbours_is_exact_and_skips_grouped_pairs() -> None:
    rng = np.random.default_rng(0)
    index = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(300, 24))).float(), dim=1)
    queries = index[:70] + 0.05 * torch.from_numpy(rng.normal(size=(70, 24))).float()
    sims = (queries @ index.T).numpy()
    got = nearest_neighbours(queries, index, chunk_rows=64, query_block=16)
    assert np.array_equal(got.index, sims.argmax(1))
    np.testing.assert_allclose(got.similarity, sims.max(1), rtol=1e-5)
    # Skipping a query's own row (group key = row id) finds the second best.
    own = np.arange(300)
    loo = nearest_neighbours(queries, index, query_groups=own[:70], index_groups=own, chunk_rows=50)
    masked = sims.copy()
    masked[np.arange(70), np.arange(70)] = -np.inf
    assert np.array_equal(loo.index, masked.argmax(1))
    assert not np.any(loo.index == np.arange(70))
    # A query's result does not depend on which other queries came with it (fixed-shape blocks).
    alone = nearest_neighbours(queries[5:6], index)
    assert alone.similarity[0] == got.similarity[5] and alone.index[0] == got.index[5]
    with pytest.raises(ValueError, match="features"):
        nearest_neighbours(queries[:, :10], index)


# --- calibration and the index files ------------------------------------------------------------------


def test_calibration_leaves_out_patient_and_duplicates(kermany: dict[str, Any], small_gate: MemorisationGate) -> None:
    idx, cal = small_gate.index, small_gate.calibration
    # Thresholds are the recorded quantile of the real-vs-train reference distribution.
    assert cal.pixel_threshold == pytest.approx(np.quantile(idx.reference_pixel, cal.quantile), abs=1e-6)
    assert cal.embedding_threshold == pytest.approx(np.quantile(idx.reference_embedding, cal.quantile), abs=1e-6)
    assert "same patient" in cal.reference["excluded_pairs"]
    assert len(idx.reference_pixel) == len(idx) == 160
    # A set of images with an exact duplicate and no patient ids: the duplicate is not a real-vs-real pair.
    images = kermany["images"][:40].copy()
    images[1] = images[0]
    embedder = small_gate.embedder
    index, cal2 = build_privacy_index(images, embedder=embedder)
    assert index.reference_pixel.max() < 0.9999
    assert "patient ids unknown" in cal2.reference["excluded_pairs"]
    with pytest.raises(ValueError, match="quantile"):
        build_privacy_index(images, embedder=embedder, quantile=0.0)
    with pytest.raises(ValueError, match="at least 2"):
        build_privacy_index(images[:1], embedder=embedder)


def test_index_files_round_trip_and_refuse_a_foreign_calibration(small_gate: MemorisationGate, tmp_path: Path) -> None:
    with pytest.raises(PrivacyIndexMissing):
        load_privacy_index(tmp_path)
    save_privacy_index(tmp_path, small_gate.index, small_gate.calibration)
    index, cal = load_privacy_index(tmp_path)
    assert index.sha256 == small_gate.index.sha256 and index.resolution == 64
    assert np.array_equal(index.pixel, small_gate.index.pixel)
    assert cal.pixel_threshold == small_gate.calibration.pixel_threshold and cal.index_sha256
    doc = json.loads((tmp_path / PRIVACY_CALIBRATION).read_text())
    doc["index_sha256"] = "0" * 64
    (tmp_path / PRIVACY_CALIBRATION).write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="another"):
        load_privacy_index(tmp_path)


# --- the proof: planted copies caught, genuine samples pass ---------------------------------------------


def test_planted_copies_caught_genuine_samples_pass(kermany: dict[str, Any]) -> None:
    """The shipped generator's gate against copies / near-copies of its real training images."""
    from models.diffusion.pipeline import CXRDiffusionPipeline, plan_generation

    gate = MemorisationGate.from_generator_dir(SHIPPED, device="cpu")
    assert len(gate.index) == len(kermany["images"]) == 5016
    planted, kinds, sources = plant_copies(kermany["images"], per_kind=12, seed=7)
    result = gate.check(planted)
    for kind in PERTURBATIONS:
        caught = ~result.passed[np.array(kinds) == kind]
        assert caught.mean() >= 0.99, f"{kind}: caught {caught.sum()}/{caught.size}"
    # The nearest training image found is the planted one's source (or an identical duplicate of it).
    same = [gate.index.sha256[n] == gate.index.sha256[s] for n, s in zip(result.pixel_neighbour, sources, strict=True)]
    assert np.mean(same) >= 0.99
    assert result.exact_copy[np.array(kinds) == "exact copy"].all()
    pipe = CXRDiffusionPipeline.from_pretrained(SHIPPED, device="cpu")
    labels = plan_generation(n=16, seed=2024, label_names=pipe.label_names)
    genuine = pipe(labels=labels, seed=2024, num_inference_steps=20).images
    verdict = gate.check(genuine)
    assert (~verdict.passed).mean() <= 0.125, verdict.pixel_similarity
    assert not verdict.exact_copy.any()


def test_gate_is_deterministic_per_image(kermany: dict[str, Any], small_gate: MemorisationGate) -> None:
    images = np.stack([shift(kermany["images"][i], 2, -3) for i in (3, 50, 999)])
    together = small_gate.check(images)
    for k in range(3):
        alone = small_gate.check(images[k : k + 1])
        assert alone.pixel_similarity[0] == together.pixel_similarity[k]
        # The embedding goes through a CNN: oneDNN picks its kernels by batch size on some CPUs (an Intel Xeon
        # without AVX512-BF16 differed in the last float32 bit), so equal to float32 rounding, same verdict.
        np.testing.assert_allclose(alone.embedding_similarity[0], together.embedding_similarity[k], rtol=0, atol=1e-6)
        assert alone.passed[0] == together.passed[k]
    with pytest.raises(ValueError, match="64x64"):
        small_gate.check(np.zeros((1, 32, 32), dtype=np.uint8))


# --- the worker's replacement loop (a stub gate, no model) ------------------------------------------------


class _RejectDark:
    """Rejects images whose mean is below 100: lets the test force rejections by content."""

    def check(self, images: np.ndarray) -> Any:
        from models.privacy.gate import GateResult

        m = images.reshape(len(images), -1).mean(1)
        sim = (255 - m) / 255
        n = len(images)
        return GateResult(sim.astype(np.float32), np.zeros(n, np.int64), sim.astype(np.float32),
                          np.zeros(n, np.int64), np.zeros(n, bool), m >= 100)


def test_gate_batch_replaces_rejected_images_with_new_seeds() -> None:
    first = np.stack([np.full((8, 8), v, np.uint8) for v in (200, 10, 150, 20)])
    calls: list[tuple[list[int], int]] = []

    def regenerate(indices: list[int], seed: int) -> np.ndarray:
        calls.append((indices, seed))
        # image 11 passes on its second attempt, image 13 never does
        return np.stack([np.full((8, 8), 180 if i == 11 else 5, np.uint8) for i in indices])

    out = gate_batch(_RejectDark(), first, [10, 11, 12, 13], regenerate, seed=7, max_attempts=3)
    assert [c[0] for c in calls] == [[11, 13], [13]]
    assert [c[1] for c in calls] == [attempt_seed(7, 1), attempt_seed(7, 2)]
    assert len(out.images) == 4 and out.images[1].mean() == 180 and out.images[0].mean() == 200
    recs = {r["index"]: r for r in out.records}
    assert recs[10]["attempts"] == 1 and recs[10]["passed"] and recs[10]["rejected"] == []
    assert recs[11]["attempts"] == 2 and recs[11]["passed"] and len(recs[11]["rejected"]) == 1
    assert recs[13]["attempts"] == 3 and not recs[13]["passed"] and len(recs[13]["rejected"]) == 2
    assert recs[11]["seed"] != recs[11]["rejected"][0]["seed"]
    assert attempt_seed(7, 0) == 7 and attempt_seed(7, 1) != attempt_seed(8, 1) != attempt_seed(7, 2)


# --- report ------------------------------------------------------------------------------------------------


def test_report_counts_rates_and_png(small_gate: MemorisationGate, kermany: dict[str, Any], tmp_path: Path) -> None:
    idx = small_gate.index
    verdicts = [ImageVerdict(i, f"normal/{i:07d}.png", 0.90 - i * 0.001, 0.5, i, i, True) for i in range(20)]
    verdicts[3].rejected = [{"attempt": 0, "seed": 1, "nn_pixel_similarity": 0.999, "nn_embedding_similarity": 0.9,
                             "exact_copy": True}]
    verdicts[4] = ImageVerdict(4, "normal/0000004.png", 0.999, 0.99, 4, 4, False,
                               rejected=[{"attempt": 0, "seed": 2, "nn_pixel_similarity": 0.998,
                                          "nn_embedding_similarity": 0.99, "exact_copy": False}])
    rep = privacy_report(verdicts, idx, small_gate.calibration, max_attempts=2)
    c = rep["counts"]
    assert (c["images"], c["candidates"], c["rejected_candidates"], c["replaced_images"], c["failed_images"],
            c["exact_copies"]) == (20, 22, 3, 2, 1, 1)
    assert rep["status"] == "failed"
    assert rep["memorisation_rate"] == pytest.approx({"before_gate": 0.1, "after_gate": 0.05,
                                                      "definition": rep["memorisation_rate"]["definition"]})
    assert rep["closest_pairs"][0]["file"] == "normal/0000004.png" and len(rep["closest_pairs"]) == 16
    assert sum(rep["histograms"]["pixel"]["synthetic_vs_train"]) == 20
    assert sum(rep["histograms"]["pixel"]["real_vs_train"]) == len(idx.reference_pixel)
    png = write_privacy_png(tmp_path / "r.png", rep, idx, verdicts, lambda p: kermany["images"][p])
    with Image.open(png) as im:
        assert im.size[0] > 800 and im.size[1] > 600
    with pytest.raises(ValueError, match="no images"):
        privacy_report([], idx, small_gate.calibration)


# --- CLI -----------------------------------------------------------------------------------------------------


def _folder(root: Path, images: np.ndarray, names: list[str]) -> Path:
    for im, name in zip(images, names, strict=True):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(path)
    return root


def test_privacy_check_cli(kermany: dict[str, Any], tmp_path: Path) -> None:
    recs = kermany["records"]
    train_idx = list(range(0, 2400, 40))  # 60 images of different patients and both labels
    train_idx += list(range(2400, len(recs), 60))
    train = tmp_path / "train"
    for i in train_idx:
        dest = train / recs[i].label / recs[i].path.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(recs[i].path, dest)
    src = kermany["images"][train_idx[:3]]
    others = [i for i in range(1, 2400, 97) if recs[i].patient_id not in {recs[j].patient_id for j in train_idx}][:3]
    queries = np.concatenate([src, src[:, :, ::-1][:1], kermany["images"][others]])
    _folder(tmp_path / "audit", queries, ["copy0.png", "copy1.png", "copy2.png", "flipped.png",
                                          "real0.png", "real1.png", "real2.png"])
    out = tmp_path / "check.json"
    args = ["privacy-check", "--train-data", str(train), "--images", str(tmp_path / "audit"), "--json", str(out),
            "--device", "cpu"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    by_file = {e["file"]: e for e in report["images"]}
    for name in ("copy0.png", "copy1.png", "copy2.png", "flipped.png"):
        assert not by_file[name]["passed"], by_file[name]
    assert by_file["copy0.png"]["exact_copy"]
    assert by_file["copy0.png"]["nearest_training_image_pixel"].endswith(recs[train_idx[0]].path.name)
    assert sum(not by_file[f"real{k}.png"]["passed"] for k in range(3)) <= 1
    assert report["counts"]["flagged"] >= 4 and report["thresholds"]["pixel"] < 1.0
    assert out.with_suffix(".png").is_file()
    strict = runner.invoke(app, [*args, "--strict"])
    assert strict.exit_code == 1
    (tmp_path / "empty").mkdir()
    empty = runner.invoke(app, ["privacy-check", "--train-data", str(train), "--images", str(tmp_path / "empty"),
                                "--json", str(tmp_path / "e.json")])
    assert empty.exit_code == 2 and "no images" in empty.output
    missing = runner.invoke(app, ["privacy-check", "--train-data", str(tmp_path / "nope"), "--images",
                                  str(train), "--json", str(tmp_path / "e.json")])
    assert missing.exit_code == 2 and "no such folder" in missing.output
    assert not (tmp_path / "e.json").exists()
