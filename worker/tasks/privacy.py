"""The memorisation gate inside generation jobs: check, replace, record, report.

In a shard, every generated batch goes through :func:`gate_batch`: an image the gate rejects is sampled
again from a new seed derived from ``(job seed, image index, attempt)`` (:func:`attempt_seed`), so a
rerun, a redelivered shard or another worker makes the same replacement bytes. After
``settings.privacy_max_attempts`` candidates the last one is kept and recorded as failed: the dataset
still has exactly N images, and its gate fails (downloads then need an admin override).

Each image's verdict (similarities, attempts, seeds of the rejected candidates) is stored as a small
JSON record under ``<dataset>/privacy/records/`` *before* its PNG, so an image that exists always has
its record, whichever delivery wrote it. :func:`finalize_privacy` turns the records into the manifest's
privacy columns, the dataset's ``gate_status`` and ``privacy`` summary, and the report JSON + PNG stored
under ``<dataset>/privacy/``.

A generator without a privacy index (made before the gate existed) is generated without a gate and its
datasets are recorded ``not_run`` with the reason; ``cxrsynth privacy-index`` adds the index.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.db.orm import Dataset, Generator
from app.storage.base import ObjectNotFound
from worker.runtime import WorkerContext

log = logging.getLogger(__name__)

_GATES: dict[str, Any] = {}
READ_WORKERS = 8
NOT_RUN_REASON = ("the generator has no privacy index (made before the memorisation gate existed); build it with "
                  "`cxrsynth privacy-index --generator DIR --train-data DIR`")


def attempt_seed(seed: int, attempt: int) -> int:
    """Request seed of replacement ``attempt`` (>= 1) of a job with ``seed``; attempt 0 is ``seed`` itself.

    Image i of attempt a then comes from ``image_seed(attempt_seed(seed, a), i)``: a function of
    (job seed, i, a) only. A hash keeps attempts of one job apart from other jobs' seeds.
    """
    if attempt == 0:
        return int(seed)
    digest = hashlib.sha256(f"cxrsynth-privacy-retry/{int(seed)}/{int(attempt)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def privacy_prefix(dataset: Dataset) -> str:
    """``tenants/t/datasets/id/privacy``: the gate's records and the privacy report of a dataset."""
    return f"{dataset.prefix.rsplit('/', 1)[0]}/privacy"


def record_key(dataset: Dataset, index: int) -> str:
    """Key of the gate record of image ``index``."""
    return f"{privacy_prefix(dataset)}/records/{index:07d}.json"


def load_gate(ctx: WorkerContext, generator_dir: Path) -> Any | None:
    """The generator's :class:`~models.privacy.MemorisationGate` (cached per process), or ``None`` when it
    has no privacy index."""
    from models.privacy import MemorisationGate, has_privacy_index

    key = str(generator_dir)
    if key not in _GATES:
        if not has_privacy_index(generator_dir):
            return None
        if len(_GATES) >= 2:
            _GATES.pop(next(iter(_GATES)))
        _GATES[key] = MemorisationGate.from_generator_dir(generator_dir, device=ctx.settings.device)
    return _GATES[key]


@dataclass
class GatedBatch:
    """Images to store (after replacements) and the gate record of each."""

    images: np.ndarray
    records: list[dict[str, Any]]


def gate_batch(
    gate: Any,
    images: np.ndarray,
    indices: Sequence[int],
    regenerate: Callable[[list[int], int], np.ndarray],
    seed: int,
    max_attempts: int,
) -> GatedBatch:
    """Check a batch; regenerate rejected images (attempt 1, 2, ...) until they pass or attempts run out.

    ``regenerate(indices, request_seed)`` samples the given image indices with ``request_seed``.
    """
    from models.diffusion.pipeline import image_seed

    out = np.array(images, copy=True)
    verdict = gate.check(out)
    records = [{"index": int(i), "attempts": 1, "request_seed": attempt_seed(seed, 0),
                "seed": image_seed(attempt_seed(seed, 0), int(i)), "rejected": [], **verdict.record(j)}
               for j, i in enumerate(indices)]
    pending = [j for j in range(len(indices)) if not verdict.passed[j]]
    attempt = 1
    while pending and attempt < max_attempts:
        req = attempt_seed(seed, attempt)
        new = regenerate([int(indices[j]) for j in pending], req)
        new_verdict = gate.check(new)
        still = []
        for k, j in enumerate(pending):
            rec = records[j]
            rec["rejected"].append({"attempt": rec["attempts"] - 1, "seed": rec["seed"],
                                    **{f: rec[f] for f in ("nn_pixel_similarity", "nn_embedding_similarity",
                                                           "exact_copy")}})
            out[j] = new[k]
            rec.update(new_verdict.record(k), attempts=rec["attempts"] + 1, request_seed=req,
                       seed=image_seed(req, int(indices[j])))
            if not new_verdict.passed[k]:
                still.append(j)
        pending = still
        attempt += 1
    return GatedBatch(out, records)


def put_record(ctx: WorkerContext, dataset: Dataset, record: dict[str, Any]) -> None:
    """Store the gate record of one image (before its PNG)."""
    ctx.store.put_bytes(record_key(dataset, int(record["index"])),
                        json.dumps(record, sort_keys=True).encode(), "application/json")


def _decode_png(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("L"), dtype=np.uint8)


@dataclass
class PrivacyOutcome:
    """What finalize writes: per-image manifest columns, dataset fields and the card entry."""

    columns: list[dict[str, Any]]  # per image: nn_pixel_similarity, nn_embedding_similarity, replaced
    gate_status: str  # passed | failed | not_run
    summary: dict[str, Any]
    seeds: list[int] | None  # the seed each released image actually came from


def finalize_privacy(
    ctx: WorkerContext,
    dataset: Dataset,
    generator: Generator,
    generator_dir: Path,
    files: Sequence[str],
    labels: Sequence[str | None],
    read_image: Callable[[int], bytes],
    seed: int,
) -> PrivacyOutcome:
    """Collect the gate records of a finished generation and write the privacy report (JSON + PNG).

    ``read_image(i)`` returns the stored PNG bytes of image ``i``; ``seed`` is the job's seed.
    """
    from models.privacy.report import ImageVerdict, privacy_report, summary_of, write_privacy_png

    n = len(files)
    gate = load_gate(ctx, generator_dir)
    if gate is None:
        summary = {"status": "not_run", "reason": NOT_RUN_REASON}
        return PrivacyOutcome([{} for _ in range(n)], "not_run", summary, None)
    verdicts: list[ImageVerdict] = []
    seeds: list[int] = []

    def read_record(i: int) -> dict[str, Any] | None:
        try:
            return dict(json.loads(ctx.store.get_bytes(record_key(dataset, i))))
        except ObjectNotFound:
            return None

    # Small objects, one GET each: read them in a few threads (S3 answers each with latency).
    with ThreadPoolExecutor(max_workers=READ_WORKERS) as pool:
        records: list[dict[str, Any] | None] = list(pool.map(read_record, range(n)))
    late = [i for i, rec in enumerate(records) if rec is None]
    if late:  # images stored without a record (e.g. the index was added mid-job): checked now
        from models.diffusion.pipeline import image_seed

        imgs = np.stack([_decode_png(read_image(i)) for i in late])
        res = gate.check(imgs)
        for k, i in enumerate(late):
            records[i] = {"index": i, "attempts": 1, "rejected": [], "seed": image_seed(seed, i), **res.record(k)}
    for i, rec in enumerate(records):
        assert rec is not None
        seeds.append(int(rec["seed"]))
        verdicts.append(ImageVerdict(
            position=i, file=files[i], pixel=float(rec["nn_pixel_similarity"]),
            embedding=float(rec["nn_embedding_similarity"]), pixel_neighbour=int(rec["nn_pixel_index"]),
            embedding_neighbour=int(rec["nn_embedding_index"]), passed=bool(rec["passed"]),
            exact_copy=bool(rec.get("exact_copy")), label=labels[i], rejected=list(rec.get("rejected", []))))
    report = privacy_report(verdicts, gate.index, gate.calibration, max_attempts=ctx.settings.privacy_max_attempts,
                            subject={"dataset_id": dataset.id, "generator_id": generator.id,
                                     "generator_name": generator.name})
    prefix = privacy_prefix(dataset)
    report_key, png_key = f"{prefix}/report.json", f"{prefix}/report.png"
    report["files"] = {"json": report_key, "png": png_key}
    ctx.store.put_bytes(report_key, json.dumps(report, indent=2).encode(), "application/json")
    with tempfile.TemporaryDirectory(prefix="cxr-privacy-") as tmp:
        path = write_privacy_png(Path(tmp) / "report.png", report, gate.index, verdicts,
                                 lambda pos: _decode_png(read_image(pos)))
        ctx.store.put_file(png_key, path, "image/png")
    summary = summary_of(report) | {"report": report_key, "report_png": png_key}
    columns = [{"nn_pixel_similarity": round(v.pixel, 6), "nn_embedding_similarity": round(v.embedding, 6),
                "replaced": "true" if v.rejected else "false"} for v in verdicts]
    if report["status"] != "passed":
        log.warning("dataset %s failed the privacy gate: %s", dataset.id, report["counts"])
    return PrivacyOutcome(columns, str(report["status"]), summary, seeds)
