"""Robustness of fine-tuned pneumonia classification to a shift of acquisition period and prevalence.

The official Kermany test split comes from another period with another prevalence; this repository
cannot see it, so the shift is rebuilt from the training folder: the ``NORMAL2-IM-*`` normals (a
distinct acquisition batch) plus the pneumonia patients ``person1500``-``person1999`` form a shifted
group that is never trained on nor used for selection (``ClassificationConfig.shifted_holdout``). Of
the other patients, a patient-level 20% is the in-distribution test folder; the rest is the training
folder (its own patient-level validation split chooses the epoch and the threshold).

A scratch timm ResNet-18 is fine-tuned at 64 px with each fine-tuning augmentation ("mild",
"shift-robust") for each seed; every registered threshold rule is then read off the same run (rules
only differ in the cut on the validation scores). Bootstrap CIs come with the run's configured rule:
``youden`` for mild runs, ``balanced-platt`` for shift-robust runs; the cross terms are point estimates.

    python benchmarks/shift_robustness.py --epochs 6 --seeds 0 1 --threads 1
    python benchmarks/shift_robustness.py --epochs 1 --seeds 0 --label-fraction 0.05 --out /tmp/smoke.json

Writes ``docs/results/shift_robustness.json`` and ``.md`` (``--out`` to change). Data are linked from a
temporary folder, never copied.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import REPO_ROOT, RESULTS_DIR, write_result

DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "kermany-pneumonia"
SHIFTED = ("NORMAL2-IM-*", "person1[5-9]??")
AUGMENTATIONS = ("mild", "shift-robust")
CONFIGURED_RULE = {"mild": "youden", "shift-robust": "balanced-platt"}


def link_folders(data: Path, work: Path, test_fraction: float, seed: int) -> dict[str, Any]:
    """Symlink the training folder (shifted group included: the evaluation holds it out itself) and a
    patient-level in-distribution test folder drawn from the non-shifted patients."""
    from models.data.folders import list_image_folder, patient_split
    from models.evaluation import hold_out_groups

    records = list_image_folder(data)
    kept, held = hold_out_groups(records, SHIFTED)
    train_idx, test_idx = patient_split(kept, val_fraction=test_fraction, seed=seed)
    parts = {"train": [kept[i] for i in train_idx] + held, "test": [kept[i] for i in test_idx]}
    for name, recs in parts.items():
        for r in recs:
            dst = work / name / r.path.parent.name / r.path.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(r.path.resolve())
    count = lambda rs, lab: sum(r.label == lab for r in rs)  # noqa: E731
    return {"images": len(records), "shifted_patterns": list(SHIFTED), "test_fraction": test_fraction,
            "split_seed": seed,
            "in_distribution_test": {"normal": count(parts["test"], "normal"),
                                     "pneumonia": count(parts["test"], "pneumonia"),
                                     "patients": len({r.patient_id for r in parts["test"]})},
            "shifted": {"normal": count(held, "normal"), "pneumonia": count(held, "pneumonia"),
                        "patients": len({r.patient_id for r in held})}}


def summarise(report: dict[str, Any]) -> dict[str, Any]:
    """The figures of one run that the tables need: per rule, and the calibration of the run."""
    rules = {name: {"threshold": row["value"], "validation": row["validation"], "test": row["test"],
                    "shifted": row["shifted"]} for name, row in report["threshold_rules"].items()}
    configured = report["threshold"]["rule"]
    cal = report["calibration"]
    return {
        "validation_auc": report["model_selection"]["validation_auc"],
        "chosen_epoch": report["model_selection"]["chosen"]["epoch"],
        "epochs": report["model_selection"]["candidates"],
        "split": report["split"],
        "rules": rules,
        "ci": {"rule": configured, "test": report["metrics"], "shifted": report["shifted"]["metrics"]},
        "calibration": {"temperature": cal["temperature"],
                        **{k: cal[k] for k in ("validation", "test", "shifted")}},
        "wall_seconds": report["wall_seconds"],
    }


def run_arm(train: Path, test: Path, augmentation: str, seed: int, epochs: int, label_fraction: float,
            n_resamples: int) -> dict[str, Any]:
    """Fine-tune one scratch ResNet-18 at 64 px and summarise its report."""
    from models.evaluation import ClassificationConfig, evaluate_classification

    cfg = ClassificationConfig(resolution=64, epochs=epochs, batch_size=32, seed=seed, augmentation=augmentation,  # type: ignore[arg-type]
                               threshold_rule=CONFIGURED_RULE[augmentation], shifted_holdout=SHIFTED,  # type: ignore[arg-type]
                               n_resamples=n_resamples)
    t0 = time.perf_counter()
    report = evaluate_classification("scratch", train, test, mode="finetune", label_fraction=label_fraction,
                                     config=cfg, device="cpu",
                                     on_step=lambda s, t, m: print(f"\r  {m} [{s}/{t}]", end="", flush=True))
    print()
    out = summarise(report)
    out["arm_wall_seconds"] = round(time.perf_counter() - t0, 1)
    return out


def _cell(values: Sequence[float]) -> str:
    mean = sum(values) / len(values)
    return f"{mean:.3f}" + (f" ({' / '.join(f'{v:.3f}' for v in values)})" if len(values) > 1 else "")


def render(doc: dict[str, Any]) -> str:
    """Markdown: setup, the rule x augmentation table (mean and per seed), CIs, calibration."""
    runs, seeds = doc["runs"], doc["seeds"]
    d = doc["data"]
    lines = [
        "# Shift robustness: fine-tuned scratch ResNet-18, 64 px, Kermany", "",
        f"`{doc['command']}` (commit `{doc['commit']}`, {doc['machine'].get('cpu')}, "
        f"{doc['threads']} torch thread(s); wall time {doc['wall_seconds']:.0f} s).", "",
        f"Shifted group (never trained on, never used for selection): `{'`, `'.join(d['shifted_patterns'])}` = "
        f"{d['shifted']['normal']} NORMAL2 normals + {d['shifted']['pneumonia']} pneumonia images "
        f"({d['shifted']['patients']} patients). In-distribution test: {d['in_distribution_test']['normal']} normal + "
        f"{d['in_distribution_test']['pneumonia']} pneumonia images ({d['in_distribution_test']['patients']} patients, "
        f"patient-level {d['test_fraction']:.0%} of the rest). {doc['epochs']} epochs, seeds {seeds}; cells are the "
        "mean over seeds (per-seed values in brackets).", "",
        "| augmentation | threshold rule | val AUC | test AUC | test spec | test sens | test F1 | shifted spec | "
        "shifted sens | shifted AUC |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for aug in doc["augmentations"]:
        rs = [runs[f"{aug}/seed{s}"] for s in seeds]
        for rule in doc["rules"]:
            rows = [r["rules"][rule] for r in rs]
            cells = [_cell([r["validation_auc"] for r in rs])] + [
                _cell([x[part][m] for x in rows])
                for part, ms in (("test", ("auc", "specificity", "sensitivity", "f1")),
                                 ("shifted", ("specificity", "sensitivity", "auc")))
                for m in ms
            ]
            lines.append(f"| {aug} | {rule} | " + " | ".join(cells) + " |")
    lines += ["", "95% bootstrap CIs (1 seed each row) for each run's configured rule:", "",
              "| run | rule | test spec | test sens | shifted spec | shifted sens |", "|---|---|---|---|---|---|"]
    fmt = lambda e: f"{e['value']:.3f} [{e['low']:.3f}, {e['high']:.3f}]"  # noqa: E731
    for key, r in runs.items():
        ci = r["ci"]
        lines.append(f"| {key} | {ci['rule']} | {fmt(ci['test']['specificity'])} | {fmt(ci['test']['sensitivity'])} | "
                     f"{fmt(ci['shifted']['specificity'])} | {fmt(ci['shifted']['sensitivity'])} |")
    lines += ["", "Calibration (ECE 15 bins / Brier), before -> after a temperature fitted on the validation logits:",
              "", "| run | T | val ECE | test ECE | test Brier | shifted ECE | shifted Brier |",
              "|---|---|---|---|---|---|---|"]
    ba = lambda c, m: f"{c['before'][m]:.3f} -> {c['after'][m]:.3f}"  # noqa: E731
    for key, r in runs.items():
        c = r["calibration"]
        lines.append(f"| {key} | {c['temperature']:.2f} | {ba(c['validation'], 'ece')} | {ba(c['test'], 'ece')} | "
                     f"{ba(c['test'], 'brier')} | {ba(c['shifted'], 'ece')} | {ba(c['shifted'], 'brier')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Command line (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("CXR_DATA_DIR", DEFAULT_DATA.parent)) /
                    "kermany-pneumonia")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--augmentations", nargs="+", default=list(AUGMENTATIONS), choices=AUGMENTATIONS)
    ap.add_argument("--test-fraction", type=float, default=0.2)
    ap.add_argument("--label-fraction", type=float, default=1.0, help="< 1 only for a smoke run")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "shift_robustness.json")
    args = ap.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    from models.evaluation import THRESHOLD_RULES

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="shift-robustness-") as tmp:
        work = Path(tmp)
        data = link_folders(args.data, work, args.test_fraction, seed=0)
        runs = {}
        for aug in args.augmentations:
            for seed in args.seeds:
                print(f"{aug} seed {seed}")
                runs[f"{aug}/seed{seed}"] = run_arm(work / "train", work / "test", aug, seed, args.epochs,
                                                    args.label_fraction, args.bootstrap)
    payload = {"data": data, "epochs": args.epochs, "seeds": args.seeds, "augmentations": args.augmentations,
               "rules": list(THRESHOLD_RULES), "label_fraction": args.label_fraction, "threads": args.threads,
               "resolution": 64, "model": "scratch timm resnet18", "runs": runs,
               "wall_seconds": round(time.perf_counter() - t0, 1)}
    path = write_result("shift_robustness", payload, args.out)
    doc = json.loads(path.read_text())
    path.with_suffix(".md").write_text(render(doc))
    print(render(doc))


if __name__ == "__main__":
    main()
