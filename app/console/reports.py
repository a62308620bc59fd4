"""What the console's report pages show, read from what the services and the worker already stored:
manifest rows (all columns), privacy reports next to a dataset, evaluation results and the
label-efficiency curves drawn from them. Read-only presentation; every figure also has a text table.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from threading import Lock
from typing import Any

from app.db.orm import Dataset
from app.schemas.datasets import DatasetOut
from app.schemas.jobs import JobOut
from app.services.exports import dataset_root
from app.storage.base import ObjectNotFound, ObjectStore

log = logging.getLogger("cxrsynth.console")

_CONTENT_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
                  ".svg": "image/svg+xml", ".webp": "image/webp", ".json": "application/json"}


def content_type(name: str) -> str:
    """Media type from a file name's suffix (``application/octet-stream`` when unknown)."""
    return _CONTENT_TYPES.get(PurePosixPath(name).suffix.lower(), "application/octet-stream")


# --------------------------------------------------------------------------------------------------
# Manifest rows with every column (the services' ManifestRow keeps file, label and sha256)
# --------------------------------------------------------------------------------------------------
class _ManifestRows:
    """Parsed manifests by key, least recently used out. Manifests never change once written (a
    synthetic dataset is immutable; an upload's manifest is written once), so a key is never stale."""

    def __init__(self, max_entries: int = 8) -> None:
        self._items: OrderedDict[str, dict[str, dict[str, str]]] = OrderedDict()
        self._max = max_entries
        self._lock = Lock()

    def get(self, store: ObjectStore, key: str) -> dict[str, dict[str, str]]:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        text = store.get_bytes(key).decode("utf-8")
        rows = {r["file"]: {k: v for k, v in r.items() if k is not None}
                for r in csv.DictReader(io.StringIO(text)) if r.get("file")}
        with self._lock:
            self._items[key] = rows
            while len(self._items) > self._max:
                self._items.popitem(last=False)
        return rows


_MANIFESTS = _ManifestRows()


def manifest_rows(store: ObjectStore, manifest_key: str) -> dict[str, dict[str, str]]:
    """Every manifest row of a dataset by ``file``, with all its columns (index, seed, sampler,
    nearest-neighbour similarities... whatever the writer put there)."""
    try:
        return _MANIFESTS.get(store, manifest_key)
    except ObjectNotFound:
        return {}


def image_alt(origin: str, file: str, label: str, row: dict[str, str]) -> str:
    """Alt text of a dataset image, e.g. "Synthetic chest X-ray #12, label pneumonia, seed 7"."""
    kind = "Synthetic" if origin == "synthetic" else "Real"
    number = f"#{row['index']}" if row.get("index") not in (None, "") else PurePosixPath(file).name
    text = f"{kind} chest X-ray {number}, label {label}"
    if row.get("seed") not in (None, ""):
        text += f", seed {row['seed']}"
    return text


# --------------------------------------------------------------------------------------------------
# Privacy
# --------------------------------------------------------------------------------------------------
def privacy_view(ds: DatasetOut) -> dict[str, Any]:
    """Gate status and summary of a dataset in words, whether or not the gate has run."""
    status = ds.gate_status or "not_run"
    if ds.origin != "synthetic":
        message = "Real data set: the memorisation gate applies to synthetic data sets."
    elif status == "not_run" or ds.privacy is None:
        message = "Privacy gate not run for this data set."
    elif status == "passed":
        message = "Privacy gate passed."
    elif status == "failed":
        message = "Privacy gate failed: downloads are blocked unless an administrator overrides it."
    else:
        message = f"Privacy gate: {status}."
    override = getattr(ds, "gate_override", None)
    if ds.origin == "synthetic" and status != "passed" and override:
        message += (f" An administrator ({override.get('by', 'unknown')}) overrode the gate on "
                    f"{str(override.get('at', ''))[:19].replace('T', ' ')}: \u201c{override.get('reason', '')}\u201d.")
    summary = ds.privacy if isinstance(ds.privacy, dict) else None
    scalars = {k: v for k, v in (summary or {}).items() if not isinstance(v, (dict, list))}
    nested = {k: v for k, v in (summary or {}).items() if isinstance(v, (dict, list))}
    return {"status": status, "ran": summary is not None, "message": message, "scalars": scalars,
            "nested": nested}


@dataclass(frozen=True)
class Figure:
    """An image of a report stored in the object store."""

    name: str
    key: str


@dataclass
class PrivacyReport:
    """The stored privacy report of a dataset: its JSON (if any) and its figures (PNGs)."""

    data: dict[str, Any] | None = None
    figures: list[Figure] = field(default_factory=list)
    json_key: str | None = None


# Where a privacy report may sit beside a dataset, besides keys the dataset's privacy summary names.
REPORT_CANDIDATES = ("privacy_report.json", "privacy_report.png", "privacy/report.json", "privacy/report.png",
                     "privacy.json", "privacy.png")


def _report_keys(store: ObjectStore, ds: Dataset) -> list[str]:
    root = dataset_root(ds) + "/"
    named: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, str) and value.startswith(root) and value.lower().endswith((".json", ".png")):
            named.append(value)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    walk(ds.privacy or {})
    keys = list(dict.fromkeys(named))
    if not keys:
        keys = [root + name for name in REPORT_CANDIDATES if store.exists(root + name)]
    return keys


def privacy_report(store: ObjectStore, ds: Dataset) -> PrivacyReport | None:
    """The privacy report stored next to ``ds`` (None when the gate has not written one)."""
    if ds.origin != "synthetic" or ds.privacy is None:
        return None
    try:
        keys = _report_keys(store, ds)
    except Exception:  # a storage hiccup must not take the page down; the summary still shows
        log.exception("could not look up the privacy report of dataset %s", ds.id)
        return None
    report = PrivacyReport()
    for key in keys:
        name = PurePosixPath(key).name
        if key.lower().endswith(".png"):
            report.figures.append(Figure(name=name, key=key))
        elif report.data is None:
            try:
                data = json.loads(store.get_bytes(key))
            except (ObjectNotFound, ValueError):
                continue
            if isinstance(data, dict):
                report.data, report.json_key = data, key
    return report if (report.data is not None or report.figures) else None


# --------------------------------------------------------------------------------------------------
# Evaluations and label efficiency
# --------------------------------------------------------------------------------------------------
def _find_report(value: Any, depth: int = 0) -> dict[str, Any] | None:
    """The evaluation report in a job result: the dict holding ``metrics`` (itself or nested)."""
    if not isinstance(value, dict) or depth > 3:
        return None
    if isinstance(value.get("metrics"), dict):
        return value
    for v in value.values():
        found = _find_report(v, depth + 1)
        if found is not None:
            return found
    return None


def _estimate(value: Any) -> tuple[float, float | None, float | None] | None:
    """``(value, low, high)`` of a metric given as a number or as ``{"value", "low", "high"}``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value), None, None
    if isinstance(value, dict) and isinstance(value.get("value"), (int, float)):
        low, high = value.get("low"), value.get("high")
        return (float(value["value"]), float(low) if isinstance(low, (int, float)) else None,
                float(high) if isinstance(high, (int, float)) else None)
    return None


def _encoder_name(report: dict[str, Any], job: JobOut) -> str:
    enc = report.get("encoder")
    if isinstance(enc, dict):
        for key in ("name", "id", "path", "backbone"):
            if isinstance(enc.get(key), str) and enc[key]:
                return str(enc[key]).rsplit("/", 1)[-1]
    if isinstance(enc, str) and enc:
        return enc.rsplit("/", 1)[-1]
    return str(job.params.get("encoder_id") or "encoder")


def evaluation_views(jobs: list[JobOut]) -> list[dict[str, Any]]:
    """Succeeded evaluation jobs as table rows: task, mode, label fraction, encoder and each metric
    with its confidence interval."""
    views = []
    for job in jobs:
        if job.status.value != "succeeded" or not job.result:
            continue
        report = _find_report(job.result)
        if report is None:
            continue
        metrics = {}
        for name, raw in report["metrics"].items():
            est = _estimate(raw)
            if est is not None:
                metrics[str(name)] = est
        if not metrics:
            continue
        fraction = report.get("label_fraction", job.params.get("label_fraction"))
        views.append({
            "job": job, "task": str(report.get("task") or job.params.get("task") or "evaluation"),
            "mode": str(report.get("mode") or job.params.get("mode") or ""),
            "label_fraction": float(fraction) if isinstance(fraction, (int, float)) else None,
            "encoder": _encoder_name(report, job), "metrics": metrics,
        })
    return views


PRIMARY_METRIC = {"classification": "auc", "segmentation": "dice"}
CHART_W, CHART_H = 560, 300
MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 56, 16, 16, 44
PALETTE = ("#1f5fa8", "#c2410c", "#15803d", "#7e22ce", "#a16207", "#0e7490")


def _x_scale(fractions: list[float]) -> tuple[float, float]:
    lo, hi = math.log10(min(fractions)), math.log10(max(fractions))
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    return lo, hi


def label_efficiency(views: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One chart per task: the primary metric (AUC, Dice) against the label fraction (log axis), a line
    per (encoder, mode) with its 95 % interval as whiskers. Coordinates are computed here and drawn as
    inline SVG by the template (no script, no image request), with the same numbers in a table."""
    charts = []
    for task in sorted({v["task"] for v in views}):
        metric = PRIMARY_METRIC.get(task)
        series: dict[str, list[tuple[float, tuple[float, float | None, float | None]]]] = {}
        for v in views:
            if v["task"] != task or v["label_fraction"] is None or v["label_fraction"] <= 0:
                continue
            name = metric if metric in v["metrics"] else next(iter(v["metrics"]))
            metric = metric or name
            if name != metric:
                continue
            key = f"{v['encoder']} ({v['mode']})" if v["mode"] else v["encoder"]
            series.setdefault(key, []).append((v["label_fraction"], v["metrics"][name]))
        points = [p for s in series.values() for p in s]
        if not points or metric is None:
            continue
        lo, hi = _x_scale([f for f, _ in points])
        ys = [y for _, (val, low, high) in points for y in (val, low, high) if y is not None]
        # Zoom to the data (in tenths) so intervals stay visible; metrics here live in [0, 1].
        y_lo = max(0.0, math.floor((min(ys) - 0.02) * 10) / 10) if min(ys) >= 0 else min(ys)
        y_hi = min(1.0, math.ceil((max(ys) + 0.02) * 10) / 10) if max(ys) <= 1 else max(ys)
        if y_hi - y_lo < 1e-9:
            y_lo, y_hi = y_lo - 0.1, y_hi + 0.1
        plot_w, plot_h = CHART_W - MARGIN_L - MARGIN_R, CHART_H - MARGIN_T - MARGIN_B

        def x_of(f: float, lo: float = lo, hi: float = hi, plot_w: float = plot_w) -> float:
            return round(MARGIN_L + (math.log10(f) - lo) / (hi - lo) * plot_w, 1)

        def y_of(y: float, y_lo: float = y_lo, y_hi: float = y_hi, plot_h: float = plot_h) -> float:
            return round(MARGIN_T + (1 - (y - y_lo) / (y_hi - y_lo)) * plot_h, 1)

        lines = []
        for i, (name, pts) in enumerate(sorted(series.items())):
            pts = sorted(pts)
            marks = [{"x": x_of(f), "y": y_of(val), "fraction": f, "value": val, "low": low, "high": high,
                      "y_low": y_of(low) if low is not None else None,
                      "y_high": y_of(high) if high is not None else None} for f, (val, low, high) in pts]
            lines.append({"name": name, "colour": PALETTE[i % len(PALETTE)], "marks": marks,
                          "path": " ".join(f"{m['x']},{m['y']}" for m in marks)})
        fractions = sorted({f for f, _ in points})
        ticks_y = [y_lo + (y_hi - y_lo) * k / 4 for k in range(5)]
        charts.append({
            "task": task, "metric": metric, "lines": lines, "width": CHART_W, "height": CHART_H,
            "x_ticks": [{"x": x_of(f), "label": f"{f:g}"} for f in fractions],
            "y_ticks": [{"y": y_of(t), "label": f"{t:.2f}"} for t in ticks_y],
            "plot": {"left": MARGIN_L, "top": MARGIN_T, "right": CHART_W - MARGIN_R, "bottom": CHART_H - MARGIN_B},
        })
    return charts
