"""The dataset card that travels inside every export, as ``card.json`` and ``README.md``.

It says what the images are and how they may be used: the dataset's identity and version (SHA-256 of
its manifest), where the generator's training data came from and under which licence (read from the
generator's ``cxrsynth.json`` and model card), the generation config, the privacy gate's result and
figures, fidelity figures when they were measured, the intended use, and the layout of the export.
Plain data in, plain data out: the service collects the inputs from its database rows.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

CARD_FORMAT = "cxrsynth-dataset-card/1"
INTENDED_USE = "research and pretraining; not for diagnosis"
OUT_OF_SCOPE = (
    "diagnosis, triage or any other clinical decision about a patient",
    "reporting clinical performance measured on synthetic images as if they were real",
    "attempts to re-identify the patients of the generator's training data",
)
REAL_DATA_LICENCE = "the uploading organisation's own data; its terms of use apply"
_LICENCE_HEADING = re.compile(r"^#+\s*data sources? and licen[cs]es?\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class CardInputs:
    """What a dataset card is made of (all JSON-able)."""

    dataset_id: str
    name: str
    origin: str  # "synthetic" | "real"
    num_images: int
    label_counts: Mapping[str, int]
    manifest_sha256: str
    created_at: str | None = None
    generator: Mapping[str, Any] | None = None  # {"id", "name", "config": cxrsynth.json, "metrics"}
    generator_readme: str = ""
    generation: Mapping[str, Any] | None = None  # the generation request's parameters
    gate_status: str = "not_run"
    privacy: Mapping[str, Any] | None = None
    fidelity: Mapping[str, Any] | None = None
    source: Mapping[str, Any] = field(default_factory=dict)  # real datasets: upload / registered prefix


def licence_sources(readme: str) -> list[dict[str, str]]:
    """The entries of a model card's "Data sources and licences" section: ``citation`` and ``licence``
    (the text after the last " — ", e.g. ``CC BY 4.0``). Continuation lines are joined."""
    entries: list[str] = []
    inside = False
    for line in readme.splitlines():
        if _LICENCE_HEADING.match(line.strip()):
            inside = True
            continue
        if inside and line.startswith("#"):
            break
        if not inside:
            continue
        if line.startswith("- "):
            entries.append(line[2:].strip())
        elif line.startswith("  ") and entries and line.strip():
            entries[-1] += " " + line.strip()
    out = []
    for text in entries:
        citation, sep, licence = text.rpartition(" — ")
        if not sep:
            citation, licence = text, ""
        out.append({"citation": citation.strip(), "licence": licence.strip().rstrip(".")})
    return out


def _generator_section(inp: CardInputs) -> dict[str, Any] | None:
    if inp.generator is None:
        return None
    config = dict(inp.generator.get("config") or {})
    training = config.get("training_data") or config.get("data_sources") or {}
    sources = licence_sources(inp.generator_readme)
    licences = sorted({s["licence"] for s in sources if s["licence"]})
    return {
        "id": inp.generator.get("id"),
        "name": inp.generator.get("name"),
        "format": config.get("format"),
        "resolution": config.get("resolution"),
        "labels": config.get("labels") or {},
        "training_data": training,
        "training_data_sources": sources,
        "training_data_licences": licences,
        "licence_note": ("synthetic images are derived from a model trained on the sources above; keep their "
                         "attribution with the images" if sources else
                         "the generator's model card names no sources; ask its owner before sharing"),
    }


def dataset_card(inp: CardInputs, export: Mapping[str, Any]) -> dict[str, Any]:
    """The card as a JSON-able dict; ``export`` describes the archive (format, layout, columns)."""
    synthetic = inp.origin == "synthetic"
    card: dict[str, Any] = {
        "card_format": CARD_FORMAT,
        "dataset": {
            "id": inp.dataset_id,
            "name": inp.name,
            "origin": inp.origin,
            "synthetic": synthetic,
            "created_at": inp.created_at,
            "num_images": inp.num_images,
            "label_counts": dict(sorted(inp.label_counts.items())),
            "version": f"sha256:{inp.manifest_sha256}",
            "immutable": synthetic,
        },
        "intended_use": INTENDED_USE,
        "out_of_scope_uses": list(OUT_OF_SCOPE),
    }
    if synthetic:
        card["generator"] = _generator_section(inp)
        card["generation"] = dict(inp.generation or {})
        card["privacy"] = {"gate_status": inp.gate_status, "summary": dict(inp.privacy) if inp.privacy else None}
        card["fidelity"] = dict(inp.fidelity) if inp.fidelity else None
    else:
        card["source"] = {**dict(inp.source), "licence": REAL_DATA_LICENCE}
    card["export"] = dict(export)
    return card


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items()) or "-"
    if isinstance(value, list | tuple):
        return ", ".join(_fmt(v) for v in value) or "-"
    return "-" if value is None or value == "" else str(value)


def _table(items: Mapping[str, Any]) -> list[str]:
    if not items:
        return ["Not recorded."]
    lines = ["| | |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |".replace("\n", " ") for k, v in items.items()]
    return lines


def card_markdown(card: Mapping[str, Any]) -> str:
    """The card as markdown (``README.md`` of an export)."""
    ds = card["dataset"]
    synthetic = bool(ds.get("synthetic"))
    title = "Synthetic chest X-ray dataset" if synthetic else "Chest X-ray dataset"
    out = [f"# {title}: {ds['name']}", ""]
    if synthetic:
        out += ["**Every image in this dataset is synthetic**: sampled from a diffusion model, not taken from a "
                "patient. It is released for research and pretraining; it is **not for diagnosis**.", ""]
    out += ["## Dataset", *_table({"id": ds["id"], "version": ds["version"], "origin": ds["origin"],
                                   "created": ds.get("created_at"), "images": ds["num_images"],
                                   "labels": ds["label_counts"]}), ""]
    out += ["## Intended use", f"{card['intended_use'].capitalize()}.", "", "Out of scope:"]
    out += [f"- {u}" for u in card.get("out_of_scope_uses", [])] + [""]
    gen = card.get("generator")
    if synthetic:
        out += ["## Generator and its training data"]
        if gen:
            out += _table({"generator": f"{gen.get('name')} ({gen.get('id')})", "resolution": gen.get("resolution"),
                           "labels": gen.get("labels"), "training data": gen.get("training_data")})
            out += ["", "Sources and licences of the training data:"]
            out += [f"- {s['citation']} — {s['licence'] or 'licence not stated'}"
                    for s in gen.get("training_data_sources", [])] or ["- not stated by the generator's card"]
            out += ["", gen.get("licence_note", ""), ""]
        else:
            out += ["The generator of this dataset is no longer known to the service.", ""]
        out += ["## Generation", *_table(card.get("generation") or {}), ""]
        privacy = card.get("privacy") or {}
        out += ["## Privacy", f"Memorisation gate: **{privacy.get('gate_status', 'not_run')}**.", ""]
        summary = privacy.get("summary")
        out += [*_table(summary), ""] if summary else ["No privacy figures were recorded for this dataset.", ""]
        fidelity = card.get("fidelity")
        out += ["## Fidelity", *(_table(fidelity) if fidelity else ["Not measured for this dataset."]), ""]
    else:
        out += ["## Source", *_table(card.get("source") or {}), ""]
    export = card.get("export") or {}
    out += ["## This export", *_table({k: v for k, v in export.items() if k != "notes"}), ""]
    out += [f"- {n}" for n in export.get("notes", [])]
    return "\n".join(out).rstrip() + "\n"
