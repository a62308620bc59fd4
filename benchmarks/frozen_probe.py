"""Frozen encoder features against logistic regression on raw pixels: is the encoder worth downloading?

Issue 12's test: "a frozen encoder that loses to raw pixels is not an encoder worth downloading". The paper
table's linear column reads each encoder the one way its protocol fixes (the model's global pool at the
pretraining resolution, readout "avg"); there the shipped encoder only ties the pixels. A hospital using the
encoder frozen may read it other ways, so this benchmark lets validation AUC choose the readout (every
``models.probe_readouts.LINEAR_READOUTS`` entry: a 2x2 grid of the last map instead of its global pool,
images at twice the resolution) together with ``C``, and gives the pixels the same freedom (their side
chosen on validation among 32 and 64).

On the paper table's patient-level split of a profile (``cpu-12`` by default: 4,013 training and 1,003
test images; the same validation carve and evaluation seeds: 0, 1, 2 below 100% labels, 0 at 100%), for
each label fraction it fits, per seed:

* ``raw-pixels``: L2 logistic regression on standardised 32x32 pixels (the paper table's baseline);
* ``raw-pixels, side chosen``: the same with the side chosen on validation among 32 and 64;
* each encoder (``--encoder NAME=DIR``, repeatable, and ``scratch``): the table's probe ("avg") and the
  probe with the readout chosen on validation.

The test split is scored once per fit. Besides each AUC [95% CI], it reports the paired difference to the
32 px pixel baseline: AUC(encoder) - AUC(pixels) on the same stratified bootstrap resamples of the same test
images. The difference is paired, so its interval is far narrower than two separate intervals side by side,
and it is the right test of "beats". Seeds combine as in the paper table (``combine_seeds``: mean, CI from
the seeds' bootstrap variances plus the variance of the seeds).

    python benchmarks/frozen_probe.py --encoder shipped=models/weights/encoder-synthetic-resnet18-64 --threads 2

Writes ``docs/results/frozen_probe.json`` and ``.md`` (``--name`` / ``--results-dir`` to change).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import RESULTS_DIR, machine_line, write_result

DEFAULT_CACHE = Path.home() / ".cache" / "cxrsynth" / "frozen_probe"
PIXEL_SIDES = (32, 64)  # the pixel baseline's candidate sides; 32 is the paper table's
N_RESAMPLES = 1000


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line (``--help`` prints the module docstring)."""
    from benchmarks.paper_table import PROFILES

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=sorted(PROFILES), default="cpu-12", help="whose split, seeds and C grid")
    ap.add_argument("--encoder", action="append", default=[], metavar="NAME=DIR",
                    help="an exported encoder folder to probe frozen; repeatable (scratch is always included)")
    ap.add_argument("--no-scratch", action="store_true", help="leave the random-encoder reference out")
    ap.add_argument("--fractions", default=None, help="label fractions, e.g. 0.01,0.1,1 (default: the profile's)")
    ap.add_argument("--data-dir", default=None, help="real data (default: $CXR_DATA_DIR or ../shared/data)")
    ap.add_argument("--run-dir", default=None, help=f"the split's folder (default: {DEFAULT_CACHE}/<profile>)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--name", default="frozen_probe")
    ap.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    ap.add_argument("--note", default="", help="how this run was made (what else ran on the machine)")
    return ap.parse_args(argv)


def parse_encoders(specs: Sequence[str], scratch: bool) -> dict[str, str]:
    """``NAME=DIR`` pairs as {name: dir} (plus ``scratch``); ``SystemExit`` naming a bad one."""
    out: dict[str, str] = {"scratch": "scratch"} if scratch else {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            raise SystemExit(f"--encoder {spec!r}: expected NAME=DIR")
        if name in out:
            raise SystemExit(f"--encoder {name!r} given twice (scratch is built in)")
        if not (Path(folder) / "config.json").is_file():
            raise SystemExit(f"--encoder {spec!r}: {folder} is not an exported encoder folder (no config.json)")
        out[name] = folder
    if not out:
        raise SystemExit("nothing to probe: give --encoder NAME=DIR or drop --no-scratch")
    return out


# --------------------------------------------------------------------------------------------------
# One fit per (arm, fraction, seed): its test probabilities and its selection
# --------------------------------------------------------------------------------------------------
def pixel_fit(train: Path, test: Path, fraction: float, seed: int, sides: Sequence[int],
              cfg: Any) -> dict[str, Any]:
    """The paper table's pixel baseline (:func:`benchmarks.paper_table.fit_pixels_on_carve`) at each side;
    the side with the best validation AUC is kept (ties: the smaller). Test probabilities of that fit."""
    from benchmarks.paper_table import fit_pixels_on_carve

    fits = {side: fit_pixels_on_carve(train, test, fraction, seed, cfg, side) for side in sorted(sides)}
    side = max(fits, key=lambda k: (fits[k].selection["validation_auc"], -k))
    fit = fits[side]
    return {"files": fit.test_files, "label": fit.y_test.tolist(), "probability": fit.p_test.tolist(),
            "chosen": {**fit.selection["chosen"], "side": side}, "validation_auc": fit.selection["validation_auc"]}


def encoder_fit(encoder: str, train: Path, test: Path, fraction: float, seed: int, readouts: Sequence[str],
                profile: Any) -> dict[str, Any]:
    """``models.evaluation``'s linear probe (the paper table's config) with these readouts to choose from."""
    from models.evaluation import ClassificationConfig, evaluate_classification

    cfg = ClassificationConfig(resolution=profile.resolution, seed=seed, scratch_model=profile.backbones[0],
                               scratch_kwargs=dict(profile.backbone_kwargs), linear_readouts=tuple(readouts),
                               **profile.cls_config)
    report = evaluate_classification(encoder, train, test, mode="linear", label_fraction=fraction, config=cfg,
                                     device="cpu", keep_scores=True)
    sel = report["model_selection"]
    return {**report["scores"]["test"], "chosen": sel["chosen"], "validation_auc": sel["validation_auc"]}


# --------------------------------------------------------------------------------------------------
# Paired statistics
# --------------------------------------------------------------------------------------------------
def paired_auc(fit: dict[str, Any], base: dict[str, Any], seed: int) -> dict[str, dict[str, float]]:
    """AUC of ``fit`` and AUC(fit) - AUC(base) with percentile 95% CIs over the same stratified bootstrap
    resamples of the test images (both scored the same images: checked by file name)."""
    from models.evaluation import auc_rows, bootstrap_indices, percentile_interval

    if fit["files"] != base["files"]:
        raise ValueError("the two fits scored different test images: a paired comparison needs the same ones")
    y = np.asarray(base["label"], dtype=np.int64)
    a, b = np.asarray(fit["probability"]), np.asarray(base["probability"])
    idx = np.concatenate([np.arange(len(y))[None], bootstrap_indices(len(y), N_RESAMPLES, seed, strata=y)])
    auc_a, auc_b = auc_rows(a[idx], y[idx]), auc_rows(b[idx], y[idx])
    out = {}
    for name, rows in (("auc", auc_a), ("delta_auc", auc_a - auc_b)):
        lo, hi = percentile_interval(rows[1:])
        out[name] = {"value": float(rows[0]), "low": lo, "high": hi}
    return out


def combine(per_seed: Sequence[dict[str, dict[str, float]]]) -> dict[str, dict[str, Any]]:
    """Each statistic over the seeds, as the paper table combines them."""
    from benchmarks.paper_table import combine_seeds

    return {"auc": combine_seeds([s["auc"] for s in per_seed]),
            "delta_auc": combine_seeds([s["delta_auc"] for s in per_seed], (-1.0, 1.0))}


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every fit of the selection; returns the results document (without provenance)."""
    import torch

    from benchmarks.paper_table import PROFILES, prepare_data
    from models.diffusion.testing import shared_data_dir
    from models.evaluation import ClassificationConfig
    from models.probe_readouts import DEFAULT_READOUT, LINEAR_READOUTS

    if args.threads:
        torch.set_num_threads(args.threads)
    profile = PROFILES[args.profile]
    encoders = parse_encoders(args.encoder, not args.no_scratch)
    fractions = sorted({float(f) for f in args.fractions.split(",")}) if args.fractions else list(profile.fractions)
    data_dir = Path(args.data_dir) if args.data_dir else shared_data_dir()
    run_dir = Path(args.run_dir) if args.run_dir else DEFAULT_CACHE / profile.name
    split = prepare_data(profile, data_dir, run_dir)
    train, test = run_dir / "data" / "cls_train", run_dir / "data" / "cls_test"
    base_cfg = ClassificationConfig(**profile.cls_config)
    if base_cfg.shifted_holdout:
        raise SystemExit(f"profile {profile.name} holds out shifted groups: the pixel baseline does not carve them")

    arms: dict[str, tuple[str, Any]] = {"raw-pixels": ("pixels", (PIXEL_SIDES[0],)),
                                        "raw-pixels, side chosen": ("pixels", PIXEL_SIDES)}
    for name, folder in encoders.items():
        arms[f"{name}, avg"] = (folder, (DEFAULT_READOUT,))
        arms[f"{name}, readout chosen"] = (folder, tuple(LINEAR_READOUTS))
    fits: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    for fraction in fractions:
        per_arm: dict[str, list[dict[str, Any]]] = {a: [] for a in arms}
        for seed in profile.seeds(fraction):
            base: dict[str, Any] | None = None
            for arm, (source, choices) in arms.items():
                t0 = time.perf_counter()
                fit = (pixel_fit(train, test, fraction, seed, choices, base_cfg) if source == "pixels" else
                       encoder_fit(source, train, test, fraction, seed, choices, profile))
                base = base or fit  # the first arm, raw pixels at 32 px, is the baseline of the pairs
                stats = paired_auc(fit, base, seed)
                per_arm[arm].append(stats)
                fits.append({"arm": arm, "label_fraction": fraction, "seed": seed, "chosen": fit["chosen"],
                             "validation_auc": fit["validation_auc"], **stats,
                             "wall_seconds": round(time.perf_counter() - t0, 2)})
                print(f"[{time.strftime('%H:%M:%S')}] {fraction:g} seed {seed} {arm}: AUC {stats['auc']['value']:.4f}"
                      f" delta {stats['delta_auc']['value']:+.4f} chosen {fit['chosen']}", flush=True)
        rows += [{"arm": arm, "label_fraction": fraction, "seeds": len(stats), **combine(stats)}
                 for arm, stats in per_arm.items()]
    return {"profile": profile.name, "encoders": encoders, "fractions": fractions,
            "readouts": {k: v._asdict() for k, v in LINEAR_READOUTS.items()}, "pixel_sides": list(PIXEL_SIDES),
            "split": {k: split[k] for k in ("cls_train", "cls_test", "test_split")}, "n_resamples": N_RESAMPLES,
            "note": args.note, "rows": rows, "fits": fits}


def _cell(m: dict[str, Any], signed: bool = False) -> str:
    fmt = "{:+.3f}" if signed else "{:.3f}"
    return f"{fmt.format(m['value'])} [{fmt.format(m['low'])}, {fmt.format(m['high'])}]"


def markdown(doc: dict[str, Any]) -> str:
    """The table: AUC and the paired difference to 32 px pixels, per arm and label fraction."""
    fractions = doc["fractions"]
    lines = [f"# Frozen features vs raw pixels ({doc['profile']} split)", "",
             f"`{doc['command']}` at `{doc['commit']}` on {machine_line(doc['machine'])}; {doc['date']}.",
             *([f"Note: {doc['note']}"] if doc["note"] else []), "",
             "Test AUC [95% CI] (mean of seeds 0, 1, 2 below 100% labels, seed 0 at 100%) and, in the second "
             "line of each cell, Δ = AUC minus that of logistic regression on 32x32 raw pixels, paired: both on "
             f"the same {doc['n_resamples']} stratified bootstrap resamples of the same "
             f"{doc['split']['cls_test']['images']} test images. Δ's CI above 0: the frozen encoder beats the "
             "pixels. Readouts and C chosen on validation AUC only (never on test).", "",
             "| arm | " + " | ".join(f"{f:.0%} labels" for f in fractions) + " |",
             "|---|" + "---|" * len(fractions)]
    by = {(r["arm"], r["label_fraction"]): r for r in doc["rows"]}
    for arm in dict.fromkeys(r["arm"] for r in doc["rows"]):
        cells = []
        for f in fractions:
            r = by[(arm, f)]
            delta = "" if arm == "raw-pixels" else f"<br>Δ {_cell(r['delta_auc'], signed=True)}"
            cells.append(_cell(r["auc"]) + delta)
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    chosen: dict[str, dict[str, int]] = {}
    for fit in doc["fits"]:
        key = fit["chosen"].get("readout") or (f"{fit['chosen']['side']} px" if "side" in fit["chosen"] else None)
        if key and "chosen" in fit["arm"]:
            chosen.setdefault(fit["arm"], {}).setdefault(str(key), 0)
            chosen[fit["arm"]][str(key)] += 1
    lines += ["", "Chosen on validation (fits per choice, over fractions and seeds): " + "; ".join(
        f"{arm}: " + ", ".join(f"{k} x{n}" for k, n in sorted(c.items())) for arm, c in chosen.items()) + ".",
        "", "Readouts: " + ", ".join(f"`{k}` = input x{v['scale']}, {v['grid']}x{v['grid']} pool"
                                   for k, v in doc["readouts"].items())
        + f". Encoders: {', '.join(f'{k} = `{v}`' for k, v in doc['encoders'].items())}. Per-seed fits, "
          "selections and wall times are in the JSON beside this file.", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run, write the JSON and the table, print the table."""
    args = parse_args(argv)
    words = list(sys.argv[1:] if argv is None else argv)
    payload = {"command": " ".join(["frozen_probe.py", *words]), **run(args)}
    path = write_result(args.name, payload, args.results_dir / f"{args.name}.json")
    doc = json.loads(path.read_text())
    md = markdown(doc)
    path.with_suffix(".md").write_text(md)
    print(md)
    return doc


if __name__ == "__main__":
    main()
