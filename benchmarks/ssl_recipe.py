"""Which SSL recipe pays most per CPU-hour? Method x resolution, equal budgets, scored by linear probes.

Issue 12 asks to pick the pretraining resolution and method for the CPU profile by the measured gain per
CPU-hour. Each candidate (``METHOD@RES``, e.g. ``dino@64``) pretrains a ResNet-18 on the real images of
the training patients (or, with ``--pretrain-data``, on other images such as a synthetic export), either for the
same CPU budget (``--cpu-minutes``: process CPU seconds, all
threads) or for the same number of image-views (``--image-views``: on a loaded machine spinning threads
inflate CPU time per step). A frozen-feature linear probe is then scored on the held-out patients at 10%
and 100% of the training labels (``models.evaluation``, patient-level validation split, C chosen on
validation, bootstrap CIs). The same probe on a randomly initialised ResNet-18 at the same resolution is
the baseline; gain per CPU-hour = (AUC - scratch AUC) / CPU hours of pretraining.

The number of steps of a candidate comes from a short timed run of it (``--calibration-steps``), so a
slower recipe (128 px, more views) gets fewer steps for the same budget, as it would in a real run.

    .venv/bin/python benchmarks/ssl_recipe.py --candidates dino@64,simclr@64,dino@128 --cpu-minutes 12
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import RESULTS_DIR, write_result
from models.data.folders import images_to_array, list_image_folder, patient_split
from models.ssl.config import PretrainConfig
from models.ssl.training import pretrain

DEFAULT_DATA = Path(os.environ.get("CXR_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
FRACTIONS = (0.1, 1.0)


def parse_candidate(text: str) -> tuple[str, int]:
    """``dino@64`` -> ("dino", 64); unknown methods fail loudly."""
    from models.ssl.training import SSL_METHODS

    method, _, res = text.partition("@")
    if method not in SSL_METHODS or not res.isdigit():
        raise SystemExit(f"bad candidate {text!r}: use METHOD@RES with METHOD in {', '.join(SSL_METHODS)}")
    return method, int(res)


def split_folders(data_dir: Path, run_dir: Path, seed: int) -> tuple[Path, Path, list[Path]]:
    """Patient-level split of Kermany into symlinked train/test ImageFolders; returns them + train paths."""
    records = list_image_folder(data_dir / "kermany-pneumonia")
    train_idx, test_idx = patient_split(records, val_fraction=0.2, seed=seed)
    for name, idx in (("train", train_idx), ("test", test_idx)):
        for i in idx:
            r = records[i]
            dest = run_dir / "data" / name / (r.label or "unlabelled") / r.path.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            if not dest.exists():
                dest.symlink_to(r.path.resolve())
    return run_dir / "data" / "train", run_dir / "data" / "test", [records[i].path for i in train_idx]


def candidate_config(method: str, resolution: int, steps: int, batch: int, seed: int) -> PretrainConfig:
    """The recipe of a candidate: the paper-table CPU settings (4 local crops, smaller DINO head)."""
    extra: dict[str, Any] = {}
    if method == "dino":
        extra = {"n_local_crops": 4, "dino_hidden_dim": 1024, "dino_bottleneck_dim": 128, "dino_output_dim": 2048}
    return PretrainConfig(method=method, resolution=resolution, max_steps=steps, batch_size=batch, seed=seed,  # type: ignore[arg-type]
                          warmup_steps=max(1, steps // 10), checkpoint_every=max(1, steps), **extra)


def cpu_seconds_per_step(images: np.ndarray, method: str, resolution: int, batch: int, steps: int) -> float:
    """Process CPU seconds per step of a short run (the first step, with one-off setup, excluded)."""
    marks: list[float] = []
    cfg = candidate_config(method, resolution, steps + 1, batch, 0)
    pretrain(images, cfg, None, on_step=lambda s, t, m: marks.append(time.process_time()), device="cpu")
    return (marks[-1] - marks[0]) / steps


def probe(encoder: str | Path, train: Path, test: Path, resolution: int, fraction: float,
          out: Path) -> dict[str, Any]:
    """Linear-probe AUC (with CI) of a frozen encoder at a label fraction."""
    from models.evaluation import ClassificationConfig, evaluate_classification

    cfg = ClassificationConfig(resolution=resolution, seed=0, scratch_model="resnet18")
    report = evaluate_classification(encoder, train, test, mode="linear", label_fraction=fraction, config=cfg,
                                     json_path=out, device="cpu")
    auc = report["metrics"]["auc"]
    return {"auc": auc["value"], "low": auc["low"], "high": auc["high"], "train_images": report["split"]["train"]}


def run_candidate(text: str, args: argparse.Namespace, paths: list[Path], train: Path, test: Path,
                  run_dir: Path) -> dict[str, Any]:
    """Calibrate, pretrain for the CPU budget, probe; cached in ``run_dir/<candidate>.json``."""
    done = run_dir / f"{text.replace('@', '-')}.json"
    if done.is_file():
        return dict(json.loads(done.read_text()))
    method, res = parse_candidate(text)
    data: np.ndarray | Path = images_to_array(paths, res, threads=2) if args.pretrain_data is None \
        else args.pretrain_data
    if args.image_views:  # equal data budgets; the gain is still divided by each candidate's measured CPU time
        s_step, steps = float("nan"), max(10, args.image_views // args.batch_size)
    else:
        if not isinstance(data, np.ndarray):
            raise SystemExit("--pretrain-data needs --image-views (the CPU calibration reads images in memory)")
        s_step = cpu_seconds_per_step(data, method, res, args.batch_size, args.calibration_steps)
        steps = max(10, int(args.cpu_minutes * 60 / s_step))
    cfg = candidate_config(method, res, steps, args.batch_size, 0)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    source = "real training patients" if args.pretrain_data is None else str(args.pretrain_data)
    result = pretrain(data, cfg, run_dir / "encoders" / text.replace("@", "-"), device="cpu",
                      notes=f"benchmarks/ssl_recipe.py candidate ({source})")
    cpu_s, wall_s = time.process_time() - cpu0, time.perf_counter() - wall0
    probes = {f"{f:g}": probe(result.out_dir or "", train, test, res, f, run_dir / "reports" / f"{text}-{f:g}.json")
              for f in FRACTIONS}
    row = {"candidate": text, "method": method, "resolution": res, "steps": steps, "batch_size": args.batch_size,
           "image_views": steps * args.batch_size, "cpu_s_per_step_calibrated": round(s_step, 3),
           "pretrain_cpu_s": round(cpu_s, 1), "pretrain_wall_s": round(wall_s, 1), "precision": result.device,
           "final_loss": result.final_loss, "pretrain_data": source, "probe": probes}
    done.write_text(json.dumps(row, indent=2) + "\n")
    return row


def scratch_rows(resolutions: set[int], train: Path, test: Path, run_dir: Path) -> dict[int, dict[str, Any]]:
    """Linear probes on a random ResNet-18 at each resolution (the zero-gain baseline); cached."""
    out: dict[int, dict[str, Any]] = {}
    for res in sorted(resolutions):
        done = run_dir / f"scratch-{res}.json"
        if not done.is_file():
            reports = run_dir / "reports"
            row = {f"{f:g}": probe("scratch:resnet18", train, test, res, f, reports / f"scratch-{res}-{f:g}.json")
                   for f in FRACTIONS}
            done.write_text(json.dumps(row, indent=2) + "\n")
        out[res] = json.loads(done.read_text())
    return out


def _ci(cell: dict[str, Any]) -> str:
    return f"{cell['auc']:.3f} [{cell['low']:.3f}, {cell['high']:.3f}]"


def write_tables(rows: list[dict[str, Any]], scratch: dict[int, dict[str, Any]], args: argparse.Namespace) -> None:
    """JSON (with gains per CPU-hour) and a markdown table beside it."""
    for r in rows:
        hours = r["pretrain_cpu_s"] / 3600
        r["gain_per_cpu_hour"] = {f: round((r["probe"][f]["auc"] - scratch[r["resolution"]][f]["auc"]) / hours, 4)
                                  for f in r["probe"]}
    budget = f"{args.image_views:,} image-views" if args.image_views else f"{args.cpu_minutes} CPU-min"
    path = write_result("ssl_recipe", {"budget": budget, "batch_size": args.batch_size,
                                       "threads": args.threads, "rows": rows,
                                       "scratch": {str(k): v for k, v in scratch.items()}}, args.out)
    data = "real training patients" if args.pretrain_data is None else f"pretrained on {args.pretrain_data}"
    lines = [f"# SSL recipe: gain per CPU-hour (ResNet-18, {data}, {budget} each)",
             "",
             f"`ssl_recipe.py {' '.join(sys.argv[1:])}`; linear-probe test AUC [95% CI] on held-out patients; "
             "gain = AUC minus the same probe on a random ResNet-18 at that resolution.", "",
             "| candidate | steps x batch | CPU s | wall s | AUC 10% labels | AUC 100% | gain/CPU-h 10% "
             "| gain/CPU-h 100% |",
             "|---|---|---|---|---|---|---|---|"]
    for res, s in sorted(scratch.items()):
        lines.append(f"| scratch@{res} | 0 | 0 | 0 | {_ci(s['0.1'])} | {_ci(s['1'])} | | |")
    for r in rows:
        p = r["probe"]
        lines.append(f"| {r['candidate']} | {r['steps']} x {r['batch_size']} | {r['pretrain_cpu_s']:.0f} | "
                     f"{r['pretrain_wall_s']:.0f} | {_ci(p['0.1'])} | {_ci(p['1'])} | "
                     f"{r['gain_per_cpu_hour']['0.1']:+.3f} | {r['gain_per_cpu_hour']['1']:+.3f} |")
    lines += ["", "CPU s: process CPU time of pretraining, all threads (the budget the gain is divided by); wall s "
              "depends on the other load of the machine. Results, command, commit and machine: `ssl_recipe.json`."]
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--candidates", default="dino@64,simclr@64,dino@128")
    ap.add_argument("--cpu-minutes", type=float, default=12.0, help="Pretraining CPU budget per candidate.")
    ap.add_argument("--image-views", type=int, default=0,
                    help="Give every candidate this many image-views (steps x batch) instead of an equal CPU budget: "
                         "use it when other load on the machine inflates CPU time per step (spinning threads).")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--calibration-steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--pretrain-data", type=Path, default=None,
                    help="Pretrain every candidate on this instead of the real training patients: a folder of "
                         "WebDataset shards or an export (e.g. a generation job's synthetic export), streamed; the "
                         "probes stay on the real patient split. Needs --image-views.")
    ap.add_argument("--run-dir", type=Path, default=Path("/tmp/cxrsynth-ssl-recipe"),
                    help="Encoders, reports and per-candidate results (resumable; outside the repo).")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "ssl_recipe.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    candidates = [c.strip() for c in args.candidates.split(",") if c.strip()]
    for c in candidates:
        parse_candidate(c)
    train, test, paths = split_folders(args.data_dir, args.run_dir, seed=0)
    rows = [run_candidate(c, args, paths, train, test, args.run_dir) for c in candidates]
    scratch = scratch_rows({r["resolution"] for r in rows}, train, test, args.run_dir)
    write_tables(rows, scratch, args)


if __name__ == "__main__":
    main()
